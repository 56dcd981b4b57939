"""The offline rubric reward (`codreamer.rewards.rubric`)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from codreamer.domain import Company, Email, Product, Prospect
from codreamer.rewards.rubric import GATE, PART_NAMES, WEIGHTED_PARTS, RubricScore, RubricWeights, score_email

PROSPECT = Prospect(
    prospect_id="p001",
    first_name="Dana",
    last_name="Whitfield",
    email="dana.whitfield@acmefreight.com",
    title="VP of Operations",
    seniority="vp",
    persona="analytical",
    pain_points=["late deliveries to retail customers", "manual dispatch scheduling"],
    company=Company(
        name="Acme Freight",
        industry="Logistics",
        employees=1200,
        headquarters="Columbus, Ohio",
        recent_news="Opened a new distribution hub in Denver in March.",
        tech_stack=["Salesforce", "SAP"],
    ),
)
PRODUCT = Product(
    name="RouteWise",
    one_liner="AI route planning that cuts late deliveries.",
    value_props=["cuts late deliveries by 30%", "automates dispatch scheduling", "integrates with SAP in a week"],
    call_to_action="Are you open to a 15-minute call next week?",
    sender_name="Sam Lee",
    sender_title="Account Executive",
)

GOOD_BODY = """Hi Dana,

Congrats on opening the new Denver distribution hub. As VP of Operations at Acme Freight, I imagine \
a new hub puts extra pressure on dispatch, and late deliveries to retail customers get expensive fast.

RouteWise plans routes with AI and automates dispatch scheduling, so your team spends less time on \
manual planning. Customers typically cut late deliveries by 30%, and it integrates with SAP in a week.

Are you open to a 15-minute call next week to see if it fits the Denver rollout?

Best,
Sam Lee"""
GOOD = Email(subject="Denver hub and on-time deliveries", body=GOOD_BODY)

GENERIC = Email(
    subject="Quick question",
    body="""Hi there,

I wanted to reach out because our product helps companies like yours improve their operations and \
save time. We work with many leading businesses and our customers love the results.

Would you be open to a quick call next week to learn more?

Best,
Sam""",
)

# Realistic failures of a small policy, each a different kind of broken. The first five are
# still emails (flawed ones); "tool_leak" and "repeated" are not emails at all.
NOT_EMAILS = ("tool_leak", "repeated")
BAD_EMAILS = {
    "hallucinated": Email(
        subject="Denver hub",
        body=GOOD_BODY.replace(
            "Customers typically cut late deliveries by 30%",
            "Globex Logistics cut late deliveries by 47% and saved $2.3M",
        ),
    ),
    "spam": Email(
        subject="ACT NOW!!! FREE offer",
        body="Hi Dana!!! This is a LIMITED TIME offer, GUARANTEED results, 100% free, risk-free. "
        "Click here to act now!!! Don't miss it!",
    ),
    "tool_leak": Email(
        subject="Hello",
        body='<tool_call>{"name": "finalize_email", "arguments": {"subject": "Hi"}}</tool_call>',
    ),
    "repeated": Email(subject="Acme Freight", body="Hi Dana, Acme Freight is great. " * 12),
    "truncated": Email(
        subject="Denver hub",
        body="Hi Dana,\n\nCongrats on opening the new Denver distribution hub. As VP of Operations at Acme",
    ),
    "placeholder": Email(
        subject="Hi [First Name]",
        body="Hi [First Name],\n\nI noticed [Company] is growing. Subject: RouteWise\n"
        "Would you like to chat?\n\nBest,\n[Your Name]",
    ),
    "generic": GENERIC,
}

WEIRD_TEXTS = [
    "",
    " \n\t ",
    "!?.,;:-" * 50,
    "Ünïcödé 日本語 テスト مرحبا 😀😀😀 \u200b\ufeff",
    "\x00\x01\x7f\ufffd\ud800",
    "word " * 2000,  # 10k chars
    "A" * 10_000,
    "1,000,000% $$$ @@@ a@b.c " * 300,
    "<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>" * 50,
    "[[[[]]]]{{{{}}}}" * 100,
]


def score(email: Email, weights: RubricWeights | None = None) -> RubricScore:
    return score_email(email, PROSPECT, PRODUCT) if weights is None else score_email(email, PROSPECT, PRODUCT, weights)


def test_good_email_scores_high_and_reports_every_part() -> None:
    result = score(GOOD)
    assert [p.name for p in result.parts] == list(PART_NAMES) == [GATE, *WEIGHTED_PARTS]
    assert result.total > 0.75
    for part in result.parts:
        assert part.explanation
        assert part.score >= 0.9, part
    assert "Acme Freight" in result.part("personalization").explanation
    metrics = result.as_metrics()
    assert set(metrics) == {f"rubric/{n}" for n in PART_NAMES} | {"rubric/total"}
    assert metrics["rubric/total"] == result.total


def test_generic_template_is_less_personal() -> None:
    good, generic = score(GOOD), score(GENERIC)
    assert generic.part("personalization").score < 0.3 < good.part("personalization").score
    assert generic.total < good.total


def test_personalization_gives_partial_credit() -> None:
    only_name = Email(subject="Hello", body="Hi Dana, hope you are well.")
    name_and_company = Email(subject="Hello", body="Hi Dana, hope all is well at Acme Freight.")
    with_pain = Email(subject="Hello", body="Hi Dana, are late deliveries still hurting Acme Freight?")
    scores = [score(e).part("personalization").score for e in (only_name, name_and_company, with_pain)]
    assert 0 < scores[0] < scores[1] < scores[2] < 1


def test_hallucinated_names_and_numbers_are_penalised_and_named() -> None:
    email = BAD_EMAILS["hallucinated"]
    part = score(email).part("no_hallucination")
    assert part.score < score(GOOD).part("no_hallucination").score
    assert part.score <= 0.5
    for token in ("Globex Logistics", "47%", "$2.3M"):
        assert token in part.explanation
    invented_email = Email(subject="Hi", body=GOOD_BODY + "\nWrite to sam@routewise.io")
    assert "sam@routewise.io" in score(invented_email).part("no_hallucination").explanation


def test_facts_are_not_hallucinations() -> None:
    body = (
        "Hi Dana, Acme Freight's 1,200 people in Columbus, Ohio run Salesforce and SAP. "
        "RouteWise cuts late deliveries by 30%. Open to a 15 minute call? Sam Lee, Account Executive"
    )
    part = score(Email(subject="Acme Freight and RouteWise", body=body)).part("no_hallucination")
    assert part.score == 1.0, part.explanation


def test_spam_is_penalised() -> None:
    spam = score(BAD_EMAILS["spam"])
    assert spam.part("no_spam").score < 0.5
    assert "guaranteed" in spam.part("no_spam").explanation
    assert spam.part("subject").score < 1.0
    mild = Email(subject="Denver hub", body=GOOD_BODY.replace("Best,", "This is a limited time offer!!\nBest,"))
    assert spam.part("no_spam").score < score(mild).part("no_spam").score < score(GOOD).part("no_spam").score


def test_empty_email_scores_low_without_crashing() -> None:
    result = score(Email(subject="", body=""))
    assert result.total < 0.1
    assert result.part("length").score == 0.0
    assert result.part("subject").score == 0.0


def test_leaked_tool_call_lowers_clean_format() -> None:
    leaked = Email(subject=GOOD.subject, body="<tool_call>\n" + GOOD_BODY)
    part = score(leaked).part("clean_format")
    assert part.score < score(GOOD).part("clean_format").score
    assert "<tool_call>" in part.explanation
    assert score(BAD_EMAILS["tool_leak"]).part("clean_format").score < 0.5
    assert score(BAD_EMAILS["repeated"]).part("clean_format").score < 0.5
    assert "placeholder" in score(BAD_EMAILS["placeholder"]).part("clean_format").explanation


def test_subject_rules() -> None:
    def subject_score(subject: str) -> float:
        return score(Email(subject=subject, body=GOOD_BODY)).part("subject").score

    assert subject_score("Denver hub and late deliveries") == 1.0
    assert subject_score("") == 0.0
    assert 0 < subject_score("Hello") < 1.0
    assert 0 < subject_score("DENVER HUB AND LATE DELIVERIES") < 1.0
    assert subject_score(" ".join(["word"] * 20)) < 1.0


def test_length_is_graded() -> None:
    def length_score(n: int) -> float:
        return score(Email(subject="Hi Dana", body=" ".join(["deliveries"] * n))).part("length").score

    assert length_score(0) == 0.0
    assert 0 < length_score(10) < length_score(40) < length_score(80) == 1.0
    assert length_score(150) == 1.0 > length_score(250) > length_score(350) >= 0.0


def test_call_to_action_is_graded() -> None:
    def cta(body: str) -> float:
        return score(Email(subject="Hi Dana", body=body)).part("call_to_action").score

    assert cta("Are you open to a quick call next week?") == 1.0
    assert 0 < cta("Let's schedule a meeting.") < 1.0
    assert 0 < cta("How is Denver going?") < cta("Let's schedule a meeting.")
    assert cta("RouteWise plans routes.") == 0.0


def test_total_is_the_gate_times_the_weighted_mean_of_the_other_parts() -> None:
    weights = RubricWeights(personalization=3, call_to_action=0, length=1, subject=1)
    for email in (GOOD, *BAD_EMAILS.values()):
        for result in (score(email), score(email, weights)):
            gate, weighted = result.parts[0], result.parts[1:]
            assert gate.name == GATE and gate.gate and gate.weight == 0
            assert not any(p.gate for p in weighted)
            mean = sum(p.score * p.weight for p in weighted) / sum(p.weight for p in weighted)
            assert result.total == pytest.approx(gate.score * mean, abs=1e-4)
    assert score(GOOD, weights).part("personalization").weight == 3
    assert sum(getattr(RubricWeights(), n) for n in WEIGHTED_PARTS) == pytest.approx(1.0)


def test_the_gate_is_a_part_with_a_metric_and_a_reason() -> None:
    good, leak = score(GOOD), score(BAD_EMAILS["tool_leak"])
    assert good.as_metrics()[f"rubric/{GATE}"] == good.part(GATE).score >= 0.95
    assert leak.as_metrics()[f"rubric/{GATE}"] == leak.part(GATE).score < 0.05
    assert "leaked JSON" in leak.part(GATE).explanation
    # The hygiene parts keep their own score (for analysis), but pay nothing to a non-email.
    assert leak.part("no_spam").score == 1.0 and leak.total <= 0.15


def test_weights_are_validated() -> None:
    with pytest.raises(ValidationError):
        RubricWeights(personalization=-1)
    with pytest.raises(ValidationError):
        RubricWeights(**dict.fromkeys(WEIGHTED_PARTS, 0))


def test_deterministic() -> None:
    for email in (GOOD, *BAD_EMAILS.values()):
        assert score(email) == score(email)


@pytest.mark.parametrize("text", WEIRD_TEXTS)
def test_scores_stay_in_range_for_weird_inputs(text: str) -> None:
    for email in (Email(subject=text, body=text), Email(subject="Hi", body=text), Email(subject=text, body=GOOD_BODY)):
        result = score(email)
        assert 0.0 <= result.total <= 1.0
        assert all(0.0 <= p.score <= 1.0 for p in result.parts)
        assert len(result.parts) == len(PART_NAMES)


def test_bad_emails_get_distinct_graded_totals() -> None:
    totals = {name: score(email).total for name, email in BAD_EMAILS.items() if name not in NOT_EMAILS}
    assert len(set(totals.values())) == len(totals), totals
    good = score(GOOD).total
    assert all(0.0 < t < good for t in totals.values()), totals
    assert totals["generic"] > max(totals[n] for n in ("spam", "truncated", "placeholder")), totals
    for name in NOT_EMAILS:  # not emails at all: no credit for the faults they lack
        assert score(BAD_EMAILS[name]).total <= 0.15, name
