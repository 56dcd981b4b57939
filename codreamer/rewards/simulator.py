"""A NAMED, SEEDED SIMULATOR of prospects reacting to emails. It is not real data.

The embedded default has no mailbox, so without this the loop would have no online
outcomes to learn from. `ProspectSimulator` turns an email into "opened" / "replied"
outcomes from the email's rubric parts and the prospect's persona: a good subject raises
the open rate, personalisation, a clear ask and no invented facts raise the reply rate,
and each persona weighs these differently (a busy executive punishes long emails, a
skeptic punishes hype). Both pulls are scaled by the rubric's `email_form` gate: word salad
or chatter gets only the persona's base rates, whatever its other parts say. Draws are
seeded by (seed, trajectory id), so the same email in the same run always gets the same
outcome. Outcomes are tagged `source="simulator"` in the event log; real outcomes replace
it through `codreamer ingest` or the webhook.

Late answers: like real prospects, the simulator answers a share of emails (`late_share`,
drawn per trajectory from its own seeded stream, independent of the outcome's draws) only
`late_iterations` iterations after they were sent (`delay_of`); the scorer holds those outcomes
back and delivers them then, so the loop's delayed credit (re-scoring and replaying earlier
groups) is exercised by every simulated run.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime

from codreamer.domain import Email, Persona, Prospect
from codreamer.events.models import OnlineOutcome
from codreamer.rewards.rubric import RubricScore

SIMULATOR_SOURCE = "simulator"


@dataclass(frozen=True)
class PersonaProfile:
    """How one persona reacts: base rates and what each part of the email is worth."""

    base_open: float
    base_reply: float
    personalization: float
    call_to_action: float
    honesty: float
    brevity: float
    no_spam: float


PROFILES: dict[Persona, PersonaProfile] = {
    "analytical": PersonaProfile(0.35, 0.02, 0.20, 0.10, 0.35, 0.05, 0.10),
    "busy_executive": PersonaProfile(0.25, 0.01, 0.15, 0.20, 0.10, 0.40, 0.05),
    "technical": PersonaProfile(0.30, 0.02, 0.35, 0.10, 0.25, 0.10, 0.05),
    "skeptical": PersonaProfile(0.20, 0.01, 0.20, 0.10, 0.25, 0.05, 0.40),
    "relationship": PersonaProfile(0.40, 0.03, 0.45, 0.20, 0.15, 0.05, 0.05),
}


def _part(rubric: RubricScore, name: str) -> float:
    return next((p.score for p in rubric.parts if p.name == name), 0.0)


def _form(rubric: RubricScore) -> float:
    """The rubric's email-form gate (1.0 for rubrics scored without one): a text that is not an
    email earns neither the subject's pull on opens nor the body's pull on replies."""
    return next((p.score for p in rubric.parts if p.name == "email_form"), 1.0)


def _rng(seed: int, trajectory_id: str, stream: str = "") -> random.Random:
    digest = hashlib.sha256(f"{seed}:{stream}{trajectory_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class ProspectSimulator:
    """Seeded simulator of opens and replies; see the module docstring."""

    def __init__(self, seed: int, *, late_share: float = 0.0, late_iterations: int = 1) -> None:
        if not 0.0 <= late_share <= 1.0:
            raise ValueError(f"late_share must be in [0, 1], got {late_share}")
        if late_iterations < 1:
            raise ValueError(f"late_iterations must be >= 1, got {late_iterations}")
        self.seed = seed
        self.late_share = late_share
        self.late_iterations = late_iterations

    def delay_of(self, trajectory_id: str) -> int:
        """Iterations after sending that this email's outcome arrives: 0, or `late_iterations`
        for a seeded `late_share` of the emails (the same email always gets the same delay)."""
        if self.late_share <= 0.0:
            return 0
        late = _rng(self.seed, trajectory_id, "late:").random() < self.late_share
        return self.late_iterations if late else 0

    def open_probability(self, prospect: Prospect, rubric: RubricScore) -> float:
        profile = PROFILES[prospect.persona]
        subject = _part(rubric, "subject") * _form(rubric)
        return min(0.95, profile.base_open + 0.5 * subject * (0.5 + 0.5 * _part(rubric, "no_spam")))

    def reply_probability(self, prospect: Prospect, rubric: RubricScore) -> float:
        """Given an open: the persona-weighted quality of the body, squared so that only
        emails that are good on what this persona cares about earn replies."""
        p = PROFILES[prospect.persona]
        weights = p.personalization + p.call_to_action + p.honesty + p.brevity + p.no_spam
        quality = (
            p.personalization * _part(rubric, "personalization")
            + p.call_to_action * _part(rubric, "call_to_action")
            + p.honesty * _part(rubric, "no_hallucination")
            + p.brevity * _part(rubric, "length")
            + p.no_spam * _part(rubric, "no_spam")
        ) / weights
        return min(0.9, p.base_reply + 0.8 * quality**2 * _part(rubric, "clean_format") * _form(rubric))

    def simulate(
        self, trajectory_id: str, prospect: Prospect, email: Email, rubric: RubricScore, step: int
    ) -> OnlineOutcome:
        rng = _rng(self.seed, trajectory_id)
        has_text = bool(email.body.strip())
        opened = has_text and rng.random() < self.open_probability(prospect, rubric)
        replied = opened and rng.random() < self.reply_probability(prospect, rubric)
        return OnlineOutcome(
            event_id=f"sim-{self.seed}-{trajectory_id}",
            trajectory_id=trajectory_id,
            prospect_id=prospect.prospect_id,
            step=step,
            timestamp=datetime.now(UTC),
            opened=opened,
            replied=replied,
            source=SIMULATOR_SOURCE,
        )
