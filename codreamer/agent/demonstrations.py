"""TemplateDemoWriter: a named, seeded generator of demonstration episodes for the warm start.

A 135M model sampled at temperature 1 never emits a tool call on its own (DESIGN.md), so RL
from the raw model has no successful episode to reinforce. The warm start teaches the
FORMAT of the task by supervised fine-tuning on demonstrations written by this generator:
look the prospect and the company up (two calls in one turn), then call `finalize_email` with an email built
from the facts the tools returned. The tool results in a demonstration come from the real
tools (`execute_tool`), and the email only uses facts those results contain, so a policy
that imitates it learns to copy facts from tool output into the email, not to recite them.

This is a template writer, not data about real people: the emails are assembled from a few
phrasings per sentence, chosen by a seeded `random.Random`, so the same seed always gives
the same demonstrations. Training prospects only: held-out prospects are never used.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import art

from codreamer.agent.prompts import initial_messages
from codreamer.agent.tools import FINALIZE_EMAIL, LOOKUP_COMPANY, LOOKUP_PROSPECT, TOOLS, execute_tool
from codreamer.domain import Email, Product, Prospect, Scenario

__all__ = ["TemplateDemoWriter"]

_GREETINGS = ("Hi {first},", "Hello {first},", "Hi {first},")
_NEWS = (
    "I saw that {company} {news}.",
    "Congrats: I read that {company} {news}.",
    "I noticed {company} {news}.",
)
_PAIN = (
    "As {title}, you may be dealing with this: {pain}.",
    "Teams like yours at {company} often tell us that {pain}.",
    "I imagine that {pain}.",
)
_VALUE = ("{one_liner}.", "{one_liner}. {value}.")
_ASK = (
    "Would you be open to {cta} to see if it fits?",
    "Are you open to {cta}?",
    "Could we find time for {cta}?",
)
_SIGN_OFF = ("Best,\n{sender}", "Thanks,\n{sender}", "Best regards,\n{sender}")
_SUBJECTS = (
    "{company} and {topic}",
    "Idea for {company}",
    "{first}, a thought on {topic}",
    "Question about {topic} at {company}",
)
_TOPIC_WORDS = 3


def _sentence_case(text: str) -> str:
    """A fact as the middle of a sentence: no final period, first letter lowered (not acronyms)."""
    text = text.strip().rstrip(".")
    return text if text[:2].isupper() else text[:1].lower() + text[1:]


def _topic(pain: str) -> str:
    """A short subject topic from a pain point: its first content words."""
    words = [
        w.strip(",.;:")
        for w in pain.split()
        if len(w) > 3 and w.lower() not in {"every", "their", "there", "about", "with", "from", "have"}
    ]
    return " ".join(words[:_TOPIC_WORDS]).lower() or "your pipeline"


class TemplateDemoWriter:
    """Writes demonstration episodes (ART trajectories) for training scenarios, seeded."""

    def __init__(self, product: Product, seed: int = 0) -> None:
        self.product = product
        self.seed = seed

    def email(self, prospect: Prospect, rng: random.Random) -> Email:
        """An email that cites the news, one pain point, the product and asks for the call."""
        company = prospect.company
        pain = rng.choice(prospect.pain_points)
        fields = {
            "first": prospect.first_name,
            "company": company.name,
            "news": _sentence_case(company.recent_news),
            "title": prospect.title,
            "pain": _sentence_case(pain),
            "one_liner": self.product.one_liner.rstrip("."),
            "value": rng.choice(self.product.value_props).strip().rstrip("."),
            "cta": self.product.call_to_action.rstrip("?."),
            "sender": self.product.sender_name,
            "topic": _topic(pain),
        }
        paragraphs = [
            rng.choice(_GREETINGS).format(**fields),
            " ".join((rng.choice(_NEWS).format(**fields), rng.choice(_PAIN).format(**fields))),
            rng.choice(_VALUE).format(**fields),
            rng.choice(_ASK).format(**fields),
            rng.choice(_SIGN_OFF).format(**fields),
        ]
        subject = rng.choice(_SUBJECTS).format(**fields)
        return Email(subject=subject[:1].upper() + subject[1:], body="\n\n".join(paragraphs))

    def episode(self, scenario: Scenario, index: int = 0) -> art.Trajectory:
        """One demonstration in two turns, with real tool results: both lookups at once, then
        finalize_email (two turns, not three: one model call less per episode, ~40 tokens less)."""
        rng = random.Random(f"{self.seed}|{scenario.scenario_id}|{index}")
        prospect = scenario.prospect
        lookup = json.dumps({"prospect_id": prospect.prospect_id})
        email = self.email(prospect, rng)
        final = json.dumps({"subject": email.subject, "body": email.body}, ensure_ascii=False)
        messages: list[Any] = list(initial_messages(prospect, self.product))
        messages += _turn(scenario, 1, [(LOOKUP_PROSPECT, lookup), (LOOKUP_COMPANY, lookup)])
        messages += _turn(scenario, 2, [(FINALIZE_EMAIL, final)])
        return art.Trajectory(
            messages_and_choices=messages,
            tools=TOOLS,
            reward=0.0,
            metadata={"scenario_id": scenario.scenario_id, "source": "TemplateDemoWriter", "demo_index": index},
        )

    def episodes(self, scenarios: Sequence[Scenario], per_scenario: int = 1) -> list[art.Trajectory]:
        """`per_scenario` demonstrations of every scenario, round by round: each round holds
        every scenario once in a seeded shuffled order, so any prefix of the list is spread
        over the scenarios as evenly as it can be."""
        if any(s.split != "train" for s in scenarios):
            raise ValueError("demonstrations are written for training scenarios only, never held-out ones")
        rng = random.Random(self.seed)
        demos: list[art.Trajectory] = []
        for index in range(per_scenario):
            order = list(scenarios)
            rng.shuffle(order)
            demos += [self.episode(s, index) for s in order]
        return demos


def _turn(scenario: Scenario, turn: int, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One assistant message with `calls` (name, JSON arguments) and the tools' real answers."""
    tool_calls, results = [], []
    for number, (name, arguments) in enumerate(calls, start=1):
        result = execute_tool(name, arguments, scenario)
        if not result.ok:
            raise ValueError(f"demonstration tool call {name} failed: {result.error}")
        call_id = f"call_demo_{turn}_{number}"
        tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        results.append({"role": "tool", "tool_call_id": call_id, "content": result.content})
    return [{"role": "assistant", "content": "", "tool_calls": tool_calls}, *results]
