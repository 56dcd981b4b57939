"""The ProspectSimulator (a named, seeded simulator): only emails earn opens and replies beyond base rates."""

from __future__ import annotations

from codreamer.config import REPO_DATA_DIR
from codreamer.data import load_task_data
from codreamer.domain import Email
from codreamer.rewards.rubric import score_email
from codreamer.rewards.simulator import PROFILES, ProspectSimulator

TASK = load_task_data(REPO_DATA_DIR)
PROSPECT = TASK.train[0].prospect
GOOD = Email(
    subject=f"{PROSPECT.company.name} and your forecast",
    body=(
        f"Hi {PROSPECT.first_name},\n\nI saw that {PROSPECT.company.name} {PROSPECT.company.recent_news}. "
        f"I imagine that {PROSPECT.pain_points[0]}.\n\n{TASK.product.one_liner}\n\n"
        f"Would you be open to {TASK.product.call_to_action}?\n\nBest,\n{TASK.product.sender_name}"
    ),
)
SALAD = Email(
    subject="Quarter board Berlin", body="quarter board Berlin index round the trust forecast weeks two moved"
)


def test_word_salad_gets_only_the_base_rates() -> None:
    simulator = ProspectSimulator(0)
    profile = PROFILES[PROSPECT.persona]
    salad = score_email(SALAD, PROSPECT, TASK.product)
    assert simulator.reply_probability(PROSPECT, salad) == profile.base_reply
    assert simulator.open_probability(PROSPECT, salad) == profile.base_open


def test_a_good_email_earns_more_than_the_base_rates() -> None:
    simulator = ProspectSimulator(0)
    profile = PROFILES[PROSPECT.persona]
    good = score_email(GOOD, PROSPECT, TASK.product)
    assert good.total >= 0.8
    assert simulator.reply_probability(PROSPECT, good) > 5 * profile.base_reply
    assert simulator.open_probability(PROSPECT, good) > profile.base_open + 0.2
