"""The offline rubric against texts that are not emails to the prospect (`codreamer.rewards.rubric`).

Every degenerate text here must score a total of at most 0.15 with the default weights, and
every good hand-written email at least 0.8, for prospects from the shipped data. The kinds:
word salad (random words, names and nouns, a good email shuffled, the prospect's facts strung
together), repetition, lorem ipsum, empty bodies, punctuation/markup/JSON, assistant chatter
and prompt echoes, and fluent emails written for another prospect or another company.
"""

from __future__ import annotations

import random
import time

import pytest

from codreamer.agent.prompts import system_prompt, user_message
from codreamer.config import REPO_DATA_DIR
from codreamer.data import load_task_data
from codreamer.domain import Email, Prospect
from codreamer.rewards.rubric import GATE, score_email

TASK = load_task_data(REPO_DATA_DIR)  # the shipped data, whatever the environment says
PRODUCT = TASK.product
PROSPECTS = {s.prospect.prospect_id: s.prospect for s in (*TASK.train, *TASK.heldout)}

DEGENERATE_MAX = 0.15
GOOD_MIN = 0.8

# Hand-written, realistic emails: greeting with the first name, the company, a pain point,
# the recent news, a question as the call to action, a sign-off with the sender's name.
GOOD: dict[str, Email] = {
    "p001": Email(
        subject="Berlin SOC and a forecast the board trusts",
        body="""Hi Grace,

Congrats on opening the new security operations centre in Berlin. With Sentrava Security growing \
that fast, I imagine the board wants a forecast it can trust, and a number that moves 20% in the \
last two weeks of the quarter makes that hard.

Pipewise logs every email, call and meeting into HubSpot automatically and builds the weekly \
forecast from real deal activity, so slipping close dates show up weeks earlier instead of on \
the last Friday.

Would you be open to a 15-minute call next week to see whether it fits your forecast process?

Best,
Maya Lindqvist
Account Executive, Pipewise""",
    ),
    "p005": Email(
        subject="Pipeline health across regions",
        body="""Hi Ingrid,

Congratulations on Peoplewell crossing 10,000 customers in April. At that scale, getting a single \
view of pipeline health across regions without asking three people is usually the first thing \
that breaks.

Pipewise captures every email, call and meeting into your CRM automatically and flags deals at \
risk before the forecast call, so you can see each region's pipeline in one place.

Are you open to a 15-minute call next week?

Best regards,
Maya Lindqvist""",
    ),
    "p006": Email(
        subject="One stage definition for Forgewell",
        body="""Hello Aisha,

I saw that Forgewell Precision acquired a smaller competitor in Boston in April. Merging two \
sales teams tends to make it worse when every team applies the stage definitions differently.

Pipewise logs activity from email, calendar and calls, so stages and forecasts are built on what \
actually happened in each deal rather than on each rep's reading of the process. It also flags \
stalled deals and single-threaded accounts early.

Would a 15-minute call next week be useful to you while the two teams come together?

Thanks,
Maya""",
    ),
    "p009": Email(
        subject="Early warning on slipping deals",
        body="""Hi Grace,

Congrats on opening the claims centre in Bristol. As VP of Sales at Prudholm Insurance you \
probably know the feeling when deals slip at the last minute with no early warning.

Pipewise watches real deal activity in Salesforce and warns you about stalled deals, \
single-threaded accounts and slipping close dates weeks before the forecast call.

Could we find 15 minutes next week to walk through how that would look for your team?

Best,
Maya Lindqvist
Account Executive, Pipewise""",
    ),
    "p002": Email(
        subject="Rotterdam SOC and pipeline activity",
        body="""Hi Farid,

I read that Ciphermoor Labs opened a security operations centre in Rotterdam in May, congrats. \
As you scale, I'd guess it stings that half the open opportunities have no activity logged in \
the last 30 days.

Pipewise fills that gap automatically: every email, meeting and call is logged to the CRM \
without reps doing it by hand, and stalled deals are flagged before they surprise you.

Would you have 15 minutes next week for a quick call?

Cheers,
Maya Lindqvist""",
    ),
    "p003": Email(
        subject="Replacing the brittle sync scripts",
        body="""Hi Ingrid,

Congrats on adding 7 electric HGVs to the Ostlane Freight fleet in February. As the Salesforce \
Administrator, you are probably the one fixing the custom sync scripts between the CRM and the \
email platform every few weeks when they break.

Pipewise syncs both ways with Salesforce and is set up in a day without custom scripts, so \
email, calendar and call activity just lands in the right records.

Are you open to a 15-minute call next week to see if it could retire those scripts?

Best,
Maya Lindqvist
Account Executive, Pipewise""",
    ),
    "p041": Email(
        subject="A forecast the board can trust",
        body="""Hi Hamza,

Congrats on adding 4 electric HGVs to the Hallowdyke Freight fleet in February. When the \
board wants a forecast it can trust and the number still moves 20% in the last two weeks of \
the quarter, the problem is usually the data the forecast is built on.

Pipewise builds a weekly forecast from real deal activity in Salesforce instead of rep-submitted \
spreadsheets, and it flags slipping close dates early.

Would you be open to a 15-minute call next week?

Kind regards,
Maya Lindqvist""",
    ),
}

# Short but real: greeting, two sentences about the prospect, an ask, a sign-off.
SHORT_REAL = Email(
    subject="Berlin SOC",
    body="""Hi Grace,

Congrats on the new Berlin security operations centre. I hear the Sentrava Security forecast \
moved a lot late in the quarter.

Open to a quick call next week?

Best,
Maya""",
)


def _shuffled(text: str, seed: int, *, keep_punctuation: bool = True) -> str:
    words = text.split() if keep_punctuation else [w.strip(".,!?;:").lower() for w in text.split()]
    random.Random(seed).shuffle(words)
    return " ".join(words)


def _fact_words(p: Prospect, seed: int, n: int = 40) -> str:
    c = p.company
    pool = " ".join(
        [p.first_name, p.last_name, p.title, c.name, c.industry, c.headquarters, c.recent_news]
        + [*p.pain_points, *c.tech_stack]
    ).split()
    rng = random.Random(seed)
    return " ".join(rng.choice(pool) for _ in range(n))


_VOCAB = (
    "round index below rosette lantern quarterly harbor velvet decide ledger orbit marble candle "
    "fabric signal meadow pivot copper tundra archive whistle ember canyon ratio vessel"
).split()
P1, P5, P6, P9, P2, P3, P41 = (PROSPECTS[k] for k in ("p001", "p005", "p006", "p009", "p002", "p003", "p041"))
GOOD1 = GOOD["p001"].body

# (kind, prospect, email); the subject is what a rollout auto-fills: the body's first words.
DEGENERATE: list[tuple[str, Prospect, Email]] = []


def _add(kind: str, prospect: Prospect, body: str, subject: str | None = None) -> None:
    auto_subject = " ".join(body.split()[:6])
    DEGENERATE.append((kind, prospect, Email(subject=auto_subject if subject is None else subject, body=body)))


# word salad
_add("salad", P1, "Philippa Lohn Callendelier Sophie. index below: round: Rosette lantern Harbor velvet. Marble!")
_add("salad", P5, " ".join(random.Random(1).choice(_VOCAB) for _ in range(60)))
_add("salad", P6, ". ".join(" ".join(random.Random(i).sample(_VOCAB, 7)).capitalize() for i in range(8)) + ".")
_add("salad", P1, "Hi Grace,\n\n" + " ".join(random.Random(2).choice(_VOCAB) for _ in range(50)) + "\n\nBest,\nMaya")
_add("salad", P9, "Grace Carter Prudholm Insurance Salesforce Bristol Atlanta Pipewise Maya HubSpot forecast.")
_add("shuffled", P1, _shuffled(GOOD1, 3))
_add("shuffled", P5, _shuffled(GOOD["p005"].body, 4))
_add("shuffled", P3, _shuffled(GOOD["p003"].body, 5, keep_punctuation=False))
_MIDDLE41 = GOOD["p041"].body.split("\n", 2)[2].rsplit("\n\n", 1)[0]  # without greeting and sign-off
_add("shuffled", P41, "Hi Hamza,\n\n" + _shuffled(_MIDDLE41, 6) + "\n\nKind regards,\nMaya Lindqvist")
# borderline: lowercased, shuffled, re-cut into capitalised "sentences", wrapped in a real frame
_LOW1 = _shuffled(GOOD1, 11, keep_punctuation=False).split()
_SENTENCES1 = " ".join(" ".join(_LOW1[i : i + 9]).capitalize() + "." for i in range(0, len(_LOW1), 9))
_add("shuffled", P1, "Hi Grace,\n\n" + _SENTENCES1 + "\n\nBest,\nMaya Lindqvist")
_add("shuffled", P1, " ".join(GOOD1.split()[::-1]))  # reversed
_add("facts_salad", P1, _fact_words(P1, 7))
_add("facts_salad", P6, _fact_words(P6, 8, 80))
_add(
    "facts_salad",
    P2,
    "Farid Thompson, VP of Revenue Operations, Ciphermoor Labs, cybersecurity, Lyon, France, "
    "Rotterdam, Microsoft Dynamics 365, Zoom, Gong, AWS, Jira, opportunities, activity, 30 days.",
)
_add(
    "facts_salad",
    P1,
    "name: Grace Schneider\ntitle: Chief Revenue Officer\ncompany: Sentrava Security\n"
    "industry: cybersecurity\nnews: opened a security operations centre in Berlin in March",
)
_add(
    "facts_salad",
    P1,
    "Sentrava Security (cybersecurity, 260 employees, Austin, TX). Recent news: opened a security "
    "operations centre in Berlin in March. Tech stack: HubSpot, Salesloft, Gong, AWS, Jira.",
)  # a tool result
# borderline: the facts as sentences, but written to no one
_add(
    "facts_salad",
    P1,
    "Chief Revenue Officer at Sentrava Security. The board wants a forecast it can trust and the "
    "number moved 20% in the last two weeks of the quarter. CISO buyers ignore generic outreach, so pipeline "
    "generation depends on a few referrals. Opened a security operations centre in Berlin in March.",
)
# repetition
_add("repeated", P1, "Grace " * 80)
_add("repeated", P5, "Peoplewell pipeline health. " * 25)
_add("repeated", P1, "Hi Grace, Sentrava Security is great. " * 15)
_add("repeated", P9, "\n\n".join([GOOD["p009"].body] * 3))
# lorem ipsum
_add(
    "lorem",
    P1,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris.",
)
_add(
    "lorem",
    P5,
    "Hi Ingrid,\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua.\n\nBest,\nMaya",
)
# empty / whitespace
_add("empty", P1, "")
_add("empty", P2, " \n\t\n ", subject="Hello Farid")
# punctuation / markup / JSON
_add("markup", P1, "!?.,;:-" * 40)
_add("markup", P1, '{"name": "finalize_email", "arguments": {"subject": "Hi Grace", "body": "Hi Grace"}}')
_add("markup", P5, '<tool_call>\n{"name": "lookup_company", "arguments": {"prospect_id": "p005"}}\n</tool_call>')
_add("markup", P6, "<|im_start|>assistant\n<tool_call></tool_call><|im_end|>")
_add("markup", P1, "```json\n" + '{"subject": "Berlin SOC", "body": ' + repr(GOOD1)[:300] + '"}\n```')
_add("markup", P3, "*** --- ### [[ ]] {{ }} <> || ___ ===")
# chatter
_add("chatter", P1, "Sure! I will look up the company first.")
_add("chatter", P5, "I'm sorry, I can't help with that.")
_add("chatter", P6, "Let me start by looking up Forgewell Precision so I can personalise the email for Aisha.")
_add(
    "chatter",
    P9,
    "First, I'll research Prudholm Insurance and their recent news. Then I will write a short, "
    "personalised outreach email to Grace that mentions a pain point and ends with a call to action.",
)
_add("chatter", P2, "Okay, here is the email for Farid Thompson at Ciphermoor Labs.")
_add(
    "chatter",
    P1,
    "As an AI language model, I don't have access to Sentrava Security's internal data, but I can "
    "draft an email based on public information.",
)
_add(
    "chatter",
    P3,
    "The prospect is Ingrid Yilmaz, Salesforce Administrator at Ostlane Freight. She struggles with "
    "brittle custom sync scripts. The company added 7 electric HGVs to its fleet in February.",
)
_add("chatter", P41, "I need to call lookup_company to get the facts about Hallowdyke Freight before I write anything.")
_add(
    "chatter",
    P5,
    "To write this email I first need more information about Ingrid and her team at Peoplewell. "
    "Could you share their recent news and the main challenges they face?",
)
_add(
    "chatter",
    P1,
    "Okay, let's see. The user wants me to write an email to Grace Schneider at Sentrava Security. "
    "First, I need to call lookup_company.",
)
_add("chatter", P1, "<think>I should first find some information about Grace.</think>")
_add(
    "chatter",
    P1,
    "Great question. Writing to a Chief Revenue Officer at a cybersecurity company like Sentrava "
    "Security means focusing on forecast accuracy. You should mention their new Berlin security operations centre, "
    "connect it to the forecast that moved 20% late in the quarter, and close with a clear ask for a 15-minute call.",
)
_add(
    "chatter",
    P1,
    "Grace Schneider is the Chief Revenue Officer at Sentrava Security. She is worried about forecast "
    "accuracy because the number moved 20% late in the quarter. Pipewise could help her team.",
)
_add("chatter", P1, "Sure! Here is a draft email for Grace:\n\n" + GOOD1)  # borderline: a real email behind chatter
_add("echo", P1, system_prompt(PRODUCT))
_add("echo", P1, user_message(P1, PRODUCT))
_add("echo", P5, system_prompt(PRODUCT) + "\n" + user_message(P5, PRODUCT))
_add(
    "echo",
    P6,
    "Write a first outreach email to Aisha Mensah at Forgewell Precision. Cite one real fact and one "
    "pain point, keep it under 120 words and sign as Maya Lindqvist.",
)
# written for someone else
_add("wrong_prospect", P5, GOOD["p001"].body)  # Grace at Sentrava, scored for Ingrid at Peoplewell
_add("wrong_prospect", P9, GOOD["p001"].body)  # same first name (Grace), other company
_add("wrong_prospect", P3, GOOD["p005"].body)  # same first name (Ingrid), other company
_add("wrong_prospect", P1, GOOD["p041"].body)
_add("wrong_company", P1, GOOD1.replace("Sentrava Security", "Northwind Analytics"))
_add("wrong_company", P5, GOOD["p005"].body.replace("Peoplewell", "Globex"))
_add("wrong_greeting", P6, GOOD["p006"].body.replace("Hello Aisha", "Hello Maya"))  # greets the sender


DEGENERATE_IDS = [f"{kind}-{i}" for i, (kind, *_) in enumerate(DEGENERATE)]


@pytest.mark.parametrize(("kind", "prospect", "email"), DEGENERATE, ids=DEGENERATE_IDS)
def test_degenerate_text_scores_at_most_015(kind: str, prospect: Prospect, email: Email) -> None:
    result = score_email(email, prospect, PRODUCT)
    assert result.total <= DEGENERATE_MAX, (kind, result.total, [(p.name, p.explanation) for p in result.parts])
    assert result.part(GATE).explanation


@pytest.mark.parametrize("prospect_id", sorted(GOOD))
def test_good_email_scores_at_least_08(prospect_id: str) -> None:
    result = score_email(GOOD[prospect_id], PROSPECTS[prospect_id], PRODUCT)
    assert result.total >= GOOD_MIN, [(p.name, p.score, p.explanation) for p in result.parts]
    assert result.part(GATE).score >= 0.95, result.part(GATE).explanation
    assert 60 <= len(GOOD[prospect_id].body.split()) <= 140


@pytest.mark.parametrize("a", sorted(GOOD))
def test_good_email_for_one_prospect_is_degenerate_for_every_other(a: str) -> None:
    for b, prospect in PROSPECTS.items():
        if b == a:
            continue
        result = score_email(GOOD[a], prospect, PRODUCT)
        assert result.total <= DEGENERATE_MAX, (a, b, result.total, result.part(GATE).explanation)


def test_the_gate_says_why() -> None:
    wrong = score_email(GOOD["p001"], P5, PRODUCT).part(GATE)
    assert "Grace" in wrong.explanation and "someone else" in wrong.explanation
    other_company = Email(subject="x", body=GOOD1.replace("Sentrava Security", "Northwind Analytics"))
    company = score_email(other_company, P1, PRODUCT)
    assert "Northwind" in company.part(GATE).explanation
    chatter = score_email(Email(subject="x", body="Sure! I will look up the company first."), P1, PRODUCT)
    assert "chatter" in chatter.part(GATE).explanation
    assert score_email(Email(subject="x", body=""), P1, PRODUCT).part(GATE).score == 0.0


def test_reward_is_graded_from_short_to_good() -> None:
    short = score_email(SHORT_REAL, P1, PRODUCT).total
    good = score_email(GOOD["p001"], P1, PRODUCT).total
    assert 0.4 <= short <= 0.75 < good, (short, good)
    no_cta = GOOD1.replace(
        "Would you be open to a 15-minute call next week to see whether it fits your forecast process?",
        "Pipewise is used by revenue teams in cybersecurity.",
    )
    no_pain = """Hi Grace,

Congrats on opening the new security operations centre in Berlin. With Sentrava Security growing that \
fast, I imagine things are busy.

Pipewise logs every email, call and meeting into HubSpot automatically, so your reps stop updating \
the CRM by hand and can spend that time selling.

Would you be open to a 15-minute call next week to see whether it fits your team?

Best,
Maya Lindqvist
Account Executive, Pipewise"""
    for subject, body in ((GOOD["p001"].subject, no_cta), ("Your new Berlin operations centre", no_pain)):
        assert body != GOOD1
        full = score_email(Email(subject=subject, body=GOOD1), P1, PRODUCT).total
        partial = score_email(Email(subject=subject, body=body), P1, PRODUCT).total
        assert 0.6 <= partial <= full - 0.05, (partial, full)


def test_scoring_is_fast() -> None:
    emails = [GOOD[k] for k in sorted(GOOD)] + [e for _, _, e in DEGENERATE]
    start = time.perf_counter()
    for _ in range(5):
        for email in emails:
            score_email(email, P1, PRODUCT)
    per_email = (time.perf_counter() - start) / (5 * len(emails))
    assert per_email < 0.02, per_email  # well under 5 ms on a quiet machine; loose for a busy CI


def test_a_policy_can_climb_from_salad_to_a_good_email() -> None:
    """Each fix pays: salad < the right prose without greeting or sign-off < a short real
    email < a full email without a call to action < the good email. No cliff in between."""
    middle = GOOD1.split("\n\n", 1)[1].rsplit("\n\nBest,", 1)[0]  # no greeting, no sign-off
    ask = "Would you be open to a 15-minute call next week to see whether it fits your forecast process?"
    no_cta = GOOD1.replace(ask, "")
    ladder = [_shuffled(GOOD1, 3), middle, SHORT_REAL.body, no_cta, GOOD1]
    totals = [score_email(Email(subject="Berlin", body=body), P1, PRODUCT).total for body in ladder]
    assert totals == sorted(totals) and len(set(totals)) == len(totals), totals
    assert totals[0] <= DEGENERATE_MAX and totals[1] >= 0.3 and totals[-1] >= GOOD_MIN, totals
