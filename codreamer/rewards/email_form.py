"""Is this text an email to THIS prospect at all? The ``email_form`` gate of the offline rubric.

Most parts of the rubric credit the absence of a fault (no spam, no invented names, clean
format), and the subject is auto-filled from the body when the agent forgets it. Without a
gate, word salad, a repeated token, leaked JSON or the assistant's own chatter collect those
credits for free (about half the reward of a good email), and GRPO climbs that. The gate is
a number in [0, 1] that multiplies the rubric's weighted mean, so that nothing is paid to a
text that is not an email to the prospect.

It is the product of cheap, deterministic factors; each one below 1 is named, with its
reason, in the explanation (e.g. "greets 'Farid', not Grace: written for someone else"):

- ``words``: a body at all; under 45 words it ramps down to 0 (a 10-word "email" has no
  room for the faults whose absence the other parts reward).
- ``prose``: English prose in order. The share of function words (word salad, strings of
  names and lorem ipsum have almost none); the share of words in sentences of 2-40 words
  that end in ., ? or ! (short greeting/sign-off lines and bullets are fine); word-order
  errors per word (``_order_errors``: "the of", "with and", a sentence ending on "the", a
  lowercase word after a full stop, a capitalised "With" mid-sentence, the prospect's names
  in lowercase: a shuffled text makes ~10 per 100 words, a written one ~0); repeated
  4-grams and low vocabulary diversity; symbols ({}, <>, quotes, underscores) and non-words.
- ``format``: leaked JSON keys or a body that starts with { or [ (x0.05), a role header
  such as "assistant:" (x0.3), leaked tool-call markup around the email (x0.5), an unfilled
  template placeholder such as "[First Name]" (x0.4).
- ``not_chatter``: the assistant talking instead of writing. Tool names and snake_case
  identifiers, "as an AI", refusals, "here is the email" (x0.05); each kind of softer sign
  x0.3: "Sure!", plans ("I will look up the company"), meta talk ("the prospect", "a
  personalised email"), advice ("you should mention"), asking the user for facts; and the
  prompt echoed back (word-trigram overlap with the system prompt and the user task).
- ``addressed``: a greeting to another name (another prospect, the sender) means the email
  was written for someone else (x0.05); so does another company named while the prospect's
  is not (x0.05); the prospect's company not named at all costs x0.6; talking about the
  prospect in the third person ("Grace is", "she wants") x0.3-0.4.
- ``frame``: a greeting (none x0.6, without the prospect's name x0.85), a sign-off (sign-off
  word or the sender's name at the end; none x0.75), the reader addressed as "you" (x0.85
  without), and someone writing at all (neither "you" nor "I/we": x0.3).

A good email scores 1 on every factor, so the gate only takes away. The factors are soft
ramps rather than thresholds where they can be, so that a policy that fixes one fault at a
time sees its reward rise at each step.

Everything here is pure and total: any string gives a score, nothing raises. The checks live
next door: `codreamer.rewards.email_text` (tokens, lines, ramps),
`codreamer.rewards.email_prose` (``prose``) and `codreamer.rewards.email_checks` (``format``,
``not_chatter``, ``addressed``, ``frame``); this module combines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from codreamer.domain import Product, Prospect
from codreamer.rewards.email_checks import (
    addressed,
    chatter,
    find_greeting,
    format_factor,
    frame,
    strip_leaks,
)
from codreamer.rewards.email_prose import proper_names, prose
from codreamer.rewards.email_text import logical_lines, ramp, tokens

__all__ = ["EmailForm", "email_form"]


@dataclass(frozen=True)
class EmailForm:
    """The gate and why: `score` in [0, 1], `explanation` for a human, `factors` for debugging."""

    score: float
    explanation: str
    factors: dict[str, float]


def email_form(body: str, prospect: Prospect, product: Product, known: Callable[[str], bool]) -> EmailForm:
    """The gate for `body` (the email text, leaked markup included); never raises.

    `known(word)` says whether a word is one of the facts or a common word (the rubric's
    `_Facts.names_word`), to tell the prospect's names from someone else's.
    """
    body = body if isinstance(body, str) else ""
    content = strip_leaks(body)
    lines = [tokens(line) for line in logical_lines(content)]
    words = [t for toks in lines for t in toks if t.word]
    if not words:
        return EmailForm(0.0, "no words: not an email", {"words": 0.0})
    factors: dict[str, float] = {}
    reasons: list[str] = []

    n = len(words)
    factors["words"] = ramp(n, 0, 45)
    if factors["words"] < 1:
        reasons.append(f"only {n} words (full credit from 45)")

    factors["prose"], why = prose(lines, words, content, proper_names(prospect, product))
    reasons += why

    factors["format"], why = format_factor(body)
    reasons += why

    lows = [t.low for t in words]
    factors["not_chatter"], why = chatter(content, lows, prospect, product)
    reasons += why

    greeting = find_greeting(lines, prospect, product, known)
    factors["addressed"], why = addressed(lines, content.lower(), prospect, known, greeting)
    reasons += why

    factors["frame"], why = frame(lines, greeting[0], set(lows), product)
    reasons += why

    score = 1.0
    for value in factors.values():
        score *= value
    score = min(1.0, max(0.0, score))
    if not reasons:
        return EmailForm(score, f"an email to {prospect.first_name} at {prospect.company.name}, signed", factors)
    low = ", ".join(f"{k} {v:.2f}" for k, v in factors.items() if v < 1)
    return EmailForm(score, "; ".join(reasons) + f" ({low})", factors)
