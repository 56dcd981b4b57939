"""Offline rubric reward: a deterministic, explainable score in [0, 1] for one outreach email.

The policy is a tiny model, so most emails are partly broken (empty, truncated, repeated,
leaked tool-call markup). Every part therefore gives graded partial credit, so that GRPO
sees different rewards inside a group, and every function accepts any string without
raising. Pure functions, no I/O; the regexes are compiled once at import.

The total is ``email_form`` x the weighted mean of the other parts (see `RubricWeights`):

- ``email_form`` (a gate, not weighted; `codreamer.rewards.email_form`): is this an email to
  THIS prospect at all: English prose in order, a greeting with the prospect's name, their
  company, a sign-off, no assistant chatter, no prompt echo, no leaked JSON. Word salad,
  repeated tokens, chatter and emails written for someone else score ~0 here, so the parts
  that credit the absence of a fault (no_spam, clean_format, no_hallucination, and the
  subject that rollouts auto-fill from the body) pay nothing to a text that is not an email.

Weighted parts (each in [0, 1]):

- ``personalization``: first name, company, a pain point, the recent news, title/industry.
- ``call_to_action``: a clear ask (a question that contains a CTA verb/phrase).
- ``length``: body word count, full credit in 50-150 words.
- ``subject``: present, 2-10 words, not ALL CAPS, not spammy.
- ``no_hallucination``: names, numbers and email addresses must come from the facts.
- ``no_spam``: no spam phrases, few "!", few ALL-CAPS words.
- ``clean_format``: no leaked markup/JSON/placeholders/"Subject:", no repetition, printable.

The three hygiene parts (no_hallucination, no_spam, clean_format) score 0 on an empty body:
an email that says nothing must not collect reward for the mistakes it did not make.
The content parts (personalization, call_to_action, length) read the body with leaked
markup such as ``<tool_call>`` removed; clean_format is where that markup is penalised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

import weave
from pydantic import BaseModel, ConfigDict, Field, model_validator

from codreamer.domain import Email, Product, Prospect
from codreamer.local_trace import traced
from codreamer.rewards.email_form import email_form
from codreamer.rewards.rubric_words import (
    ACRONYM_OK,
    COMMON,
    CTA_PHRASES,
    CTA_WORDS,
    GENERIC_STEMS,
    SPAM_PHRASES,
    STOPWORDS,
)

__all__ = ["GATE", "PART_NAMES", "WEIGHTED_PARTS", "RubricPart", "RubricScore", "RubricWeights", "score_email"]

#: The part that multiplies the weighted mean of the others (see `codreamer.rewards.email_form`).
GATE = "email_form"

#: The parts combined as a weighted mean; each is a field of `RubricWeights`.
WEIGHTED_PARTS: tuple[str, ...] = (
    "personalization",
    "call_to_action",
    "length",
    "subject",
    "no_hallucination",
    "no_spam",
    "clean_format",
)

#: Every part of a `RubricScore`, in order: the gate first, then the weighted parts.
PART_NAMES: tuple[str, ...] = (GATE, *WEIGHTED_PARTS)


# --------------------------------------------------------------------------- models


class RubricPart(BaseModel):
    """One scored criterion with a short human explanation.

    A gate part (``gate=True``, weight 0) multiplies the total instead of being averaged in.
    """

    name: str
    score: float = Field(ge=0.0, le=1.0)
    weight: float = Field(ge=0.0)
    explanation: str
    gate: bool = False


class RubricScore(BaseModel):
    """All parts and the total: the gate times the weighted mean of the other parts."""

    parts: list[RubricPart]
    total: float = Field(ge=0.0, le=1.0)

    def part(self, name: str) -> RubricPart:
        """The part called `name` (KeyError if absent)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def as_metrics(self) -> dict[str, float]:
        """{"rubric/<part>": score, ..., "rubric/total": total}, for logging."""
        metrics = {f"rubric/{p.name}": p.score for p in self.parts}
        metrics["rubric/total"] = self.total
        return metrics


class RubricWeights(BaseModel):
    """Weight of each part in the total (need not sum to 1; the total is a weighted mean)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    personalization: float = Field(default=0.25, ge=0.0)
    call_to_action: float = Field(default=0.15, ge=0.0)
    length: float = Field(default=0.10, ge=0.0)
    subject: float = Field(default=0.10, ge=0.0)
    no_hallucination: float = Field(default=0.20, ge=0.0)
    no_spam: float = Field(default=0.10, ge=0.0)
    clean_format: float = Field(default=0.10, ge=0.0)

    @model_validator(mode="after")
    def _positive_sum(self) -> RubricWeights:
        if sum(getattr(self, n) for n in WEIGHTED_PARTS) <= 0:
            raise ValueError("at least one rubric weight must be positive")
        return self


#: The default weights (frozen, so one shared instance is safe as a default argument).
DEFAULT_WEIGHTS = RubricWeights()

# --------------------------------------------------------------------------- regexes

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")  # surface words, for counting
_WORD_RE = re.compile(r"([a-z0-9]+(?:['’](?!s\b)[a-z]+)?)(?:['’]s\b)?")  # on lowercased text
_CAP_SEQ_RE = re.compile(r"\b[A-Z][A-Za-z0-9&'’\-]*+(?:[ \t]+[A-Z][A-Za-z0-9&'’\-]*+)+")
_CAMEL_RE = re.compile(r"\b[A-Z]?[a-z]++[A-Z][A-Za-z0-9]*+")
_NUMBER_RE = re.compile(r"(?<![\w.])([$€£]?)(\d+(?:[.,]\d+)*+)(\s?%|[kKmMxX]\b|\s?(?:bn|million|billion)\b)?")
_EMAIL_RE = re.compile(r"(?<![\w.+\-])[\w.+\-]++@[\w\-]+(?:\.[\w\-]+)+")
_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?\n]*")
_MINUTES_RE = re.compile(r"(?<!\d)\d++\s*+-?\s*+min")
_CAPS_WORD_RE = re.compile(r"\b[A-Z]{3,}\b")
_MARKUP_RE = re.compile(
    r"</?\s*(?:tool_call|tool_response|tools|think|function|functions|arguments|email|body|subject)\s*/?>"
    r"|<\|[^|>\n]{0,40}\|>|```",
    re.I,
)
_ROLE_RE = re.compile(r"(?im)^[ \t]*(?:assistant|user|system|tool)\s*:")
_JSON_RE = re.compile(r"[{}]|\"\w++\"\s*+:")
_SUBJECT_IN_BODY_RE = re.compile(r"\bsubject\s*:", re.I)
_PLACEHOLDER_RE = re.compile(r"\[[A-Za-z][A-Za-z _'’\-]{1,30}\]|\b(?:lorem ipsum|xxx+|tbd)\b", re.I)
_NONPRINT_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\ud800-\udfff]")
_FAKE_REPLY_RE = re.compile(r"^\s*(?:re|fwd?)\s*:", re.I)
_SUBJECT_PREFIX_RE = re.compile(r"^\s*subject\s*:", re.I)

_SMALL_NUMBERS_OK = frozenset({*(str(i) for i in range(13)), "15", "20", "24", "30", "45", "60"})


# --------------------------------------------------------------------------- helpers


def _words(text: str) -> list[str]:
    """Word tokens, lowercased, possessive "'s" dropped ("Acme's" -> "acme")."""
    return _WORD_RE.findall(text.lower())


@lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    """Very light stemmer: drop a plural/verb suffix, then keep at most 6 characters.

    Good enough to match "deliveries"/"delivery", "delays"/"delayed", "automated"/"automate".
    """
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "xes", "zes", "ches", "shes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        w = w[:-1]
    elif w.endswith("ing") and len(w) > 5:
        w = w[:-3]
    elif w.endswith("ed") and len(w) > 4:
        w = w[:-2]
    return w[:6]


def _content_stems(text: str) -> set[str]:
    """Stems of the content words (>= 3 chars, not stopwords) of `text`."""
    return {_stem(w) for w in _words(text) if len(w) >= 3 and w not in STOPWORDS}


def _joined(words: list[str]) -> str:
    """ " w1 w2 ... " so that `f" {phrase} " in joined` is a whole-word phrase match."""
    return " " + " ".join(words) + " "


def _phrase_words(phrase: str) -> str:
    return " " + " ".join(_words(phrase)) + " "


_SPAM_KEYS = tuple((p, _phrase_words(p)) for p in SPAM_PHRASES)
_CTA_KEYS = tuple(_phrase_words(p) for p in CTA_PHRASES)


def _spam_phrases(text: str, joined: str) -> list[str]:
    """Spam phrases found in `text` (`joined` is its `_joined` word sequence)."""
    hits = [p for p, key in _SPAM_KEYS if key in joined]
    if "$$$" in text:
        hits.append("$$$")
    return hits


def _quote(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(f"'{i}'" for i in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _clip(x: float) -> float:
    return round(min(1.0, max(0.0, x)), 4)


class _Facts:
    """Everything the email may legitimately mention, precomputed once per call."""

    __slots__ = ("emails", "numbers", "stems", "words")

    def __init__(self, prospect: Prospect, product: Product) -> None:
        c = prospect.company
        texts = [
            prospect.first_name, prospect.last_name, prospect.email, prospect.title,
            prospect.seniority.replace("_", " "), *prospect.pain_points,
            c.name, c.industry, str(c.employees), c.headquarters, c.recent_news, *c.tech_stack,
            product.name, product.one_liner, *product.value_props, product.call_to_action,
            product.sender_name, product.sender_title,
        ]  # fmt: skip
        text = "\n".join(texts)
        self.words = frozenset(_words(text))
        self.stems = frozenset(_stem(w) for w in self.words)
        self.numbers = frozenset(m.group(2).replace(",", "") for m in _NUMBER_RE.finditer(text))
        self.emails = frozenset({prospect.email.lower()})

    def knows_word(self, word: str, *, exact: bool = False) -> bool:
        """Is `word` a common word or one of the facts (by stem; by exact word if `exact`)."""
        w = word.lower().replace("’", "'").strip("'-&")
        if w.endswith("'s"):
            w = w[:-2]
        return not w or w in COMMON or w in self.words or (not exact and _stem(w) in self.stems)

    def names_word(self, word: str) -> bool:
        """`knows_word` without stemming: "Peoplewell" is not "people"; for telling names apart."""
        return self.knows_word(word, exact=True)


# --------------------------------------------------------------------------- parts


def _personalization(words: set[str], text_low: str, prospect: Prospect) -> tuple[float, str]:
    """Graded credit: first name .2, company .25, pain point .25, recent news .2, role .1."""
    stems = {_stem(w) for w in words}
    c = prospect.company
    hits: list[str] = []
    missing: list[str] = []
    score = 0.0

    first = _words(prospect.first_name)
    if first and words.issuperset(first):
        score += 0.2
        hits.append(f"first name '{prospect.first_name}'")
    else:
        missing.append("first name")

    name = c.name.strip().lower()
    head = next((w for w in _words(name) if len(w) >= 3 and w not in STOPWORDS), "")
    if name and name in text_low:
        score += 0.25
        hits.append(f"company '{c.name}'")
    elif head and head in words:
        score += 0.2
        hits.append(f"company (partly) '{head}'")
    else:
        missing.append("company")

    company_stems = _content_stems(c.name)
    best, best_pp, best_n = 0.0, "", 0
    for pp in prospect.pain_points:
        cw = _content_stems(pp) - GENERIC_STEMS
        if not cw:
            continue
        n = len(cw & stems)
        credit = min(1.0, n / min(2, len(cw)))
        if credit > best:
            best, best_pp, best_n = credit, pp, n
    if best > 0:
        score += 0.25 * best
        hits.append(f"pain point '{best_pp}' ({best_n} keywords)")
    else:
        missing.append("pain point")

    news_hits = (_content_stems(c.recent_news) - company_stems - GENERIC_STEMS) & stems
    if news_hits:
        score += 0.2 * min(1.0, len(news_hits) / 2)
        hits.append(f"recent news ({len(news_hits)} keywords)")
    else:
        missing.append("recent news")

    role = 0.0
    title = prospect.title.strip().lower()
    if title and title in text_low:
        role += 0.5
    elif _content_stems(title) & stems:
        role += 0.25
    if _content_stems(c.industry) & stems:
        role += 0.5
    if role:
        score += 0.1 * role
        hits.append("title/industry")
    else:
        missing.append("title/industry")

    expl = ("mentions " + ", ".join(hits)) if hits else "no personal details"
    if missing and hits:
        expl += "; missing " + ", ".join(missing)
    return score, expl


def _call_to_action(body: str, product: Product) -> tuple[float, str]:
    """1.0 for a question that contains an ask; partial for a question or an ask alone."""
    cta_stems = _content_stems(product.call_to_action) - GENERIC_STEMS
    need = min(2, len(cta_stems))

    def has_cta(s: str) -> bool:
        words = _words(s)
        if CTA_WORDS.intersection(words) or _MINUTES_RE.search(s):
            return True
        joined = _joined(words)
        if any(key in joined for key in _CTA_KEYS):
            return True
        return need > 0 and len(cta_stems.intersection(_stem(w) for w in words)) >= need

    questions = [s for s in _SENTENCE_RE.findall(body) if "?" in s]
    if any(has_cta(q) for q in questions):
        return 1.0, "asks a question with a clear call to action"
    cta = has_cta(body)
    if questions and cta:
        return 0.75, "has a question and a call to action, but not in the same sentence"
    if cta:
        return 0.5, "call to action without a question"
    if questions:
        return 0.3, "a question but no clear ask (call/chat/meeting)"
    return 0.0, "no call to action"


def _length(n_words: int) -> tuple[float, str]:
    """1.0 in 50-150 words; linear ramp from 0 below 50; linear decay to 0 at 400."""
    if n_words <= 0:
        return 0.0, "empty body"
    if n_words < 50:
        return n_words / 50, f"{n_words} words, too short (ideal 50-150)"
    if n_words <= 150:
        return 1.0, f"{n_words} words (ideal 50-150)"
    return max(0.0, 1 - (n_words - 150) / 250), f"{n_words} words, too long (ideal 50-150)"


def _subject(subject: str) -> tuple[float, str]:
    """Present, 2-10 words; multiplied down for ALL CAPS, spam, markup, fake "Re:"."""
    s = subject.strip()
    words = _words(s)
    n = len(words)
    if n == 0:
        return 0.0, "missing subject"
    issues: list[str] = []
    if n == 1:
        score = 0.5
        issues.append("one word")
    elif n <= 10:
        score = 1.0
    else:
        score = max(0.1, 1 - 0.08 * (n - 10))
        issues.append(f"{n} words (ideal 2-10)")
    letters = [ch for ch in s if ch.isalpha()]
    if len(letters) >= 4 and all(ch.isupper() for ch in letters):
        score *= 0.4
        issues.append("ALL CAPS")
    if _spam_phrases(s, _joined(words)) or "!" in s or "$" in s or "free" in words:
        score *= 0.5
        issues.append("spammy")
    if _MARKUP_RE.search(s) or _JSON_RE.search(s) or "\n" in s or _NONPRINT_RE.search(s):
        score *= 0.5
        issues.append("markup/garbage")
    if _SUBJECT_PREFIX_RE.search(s):
        score *= 0.8
        issues.append("'Subject:' prefix")
    elif _FAKE_REPLY_RE.search(s):
        score *= 0.7
        issues.append("fake Re:/Fwd:")
    return score, (f"{n} words, ok" if not issues else "; ".join(issues))


def _no_hallucination(text: str, facts: _Facts) -> tuple[float, str]:
    """1 - 0.25 per distinct suspicious name/number/email not backed by the facts.

    Names: runs of 2+ capitalised words (or CamelCase words) with a word that is neither a
    fact nor a common word; ALL-CAPS runs are shouting, left to `no_spam`. Numbers: not in
    the facts, except small bare numbers ("15 minutes"). Emails: anything but the prospect's.
    """
    suspicious: list[str] = []

    def flag(token: str) -> None:
        token = token.strip()
        if token and token not in suspicious:
            suspicious.append(token)

    for m in _CAP_SEQ_RE.finditer(text):
        seq = m.group(0)
        if not seq.isupper() and not all(facts.knows_word(w) for w in seq.split()):
            flag(seq)
    for m in _CAMEL_RE.finditer(text):
        if not facts.knows_word(m.group(0)) and not any(m.group(0) in s for s in suspicious):
            flag(m.group(0))
    email_spans: list[tuple[int, int]] = []
    if "@" in text:
        for m in _EMAIL_RE.finditer(text):
            email_spans.append(m.span())
            if m.group(0).lower().strip(".") not in facts.emails:
                flag(m.group(0))
    for m in _NUMBER_RE.finditer(text):
        if any(a <= m.start() < b for a, b in email_spans):
            continue
        cur, digits, suffix = m.group(1), m.group(2).replace(",", ""), m.group(3)
        if digits in facts.numbers or (not cur and not suffix and digits in _SMALL_NUMBERS_OK):
            continue
        flag(m.group(0))

    if not suspicious:
        return 1.0, "no unsupported names, numbers or emails"
    return 1 - 0.25 * len(suspicious), f"unsupported: {_quote(suspicious)}"


def _no_spam(text: str, joined: str, facts: _Facts) -> tuple[float, str]:
    """1 - .25 per spam phrase - .1 per "!" beyond the first (max .5) - .1 per CAPS word (max .5)."""
    phrases = _spam_phrases(text, joined)
    bangs = text.count("!")
    caps = sorted({w for w in _CAPS_WORD_RE.findall(text) if w not in ACRONYM_OK and w.lower() not in facts.words})
    penalty = 0.25 * len(phrases) + min(0.5, 0.1 * max(0, bangs - 1)) + min(0.5, 0.1 * len(caps))
    issues = []
    if phrases:
        issues.append(f"spam phrases {_quote(phrases)}")
    if bangs > 1:
        issues.append(f"{bangs} '!'")
    if caps:
        issues.append(f"ALL-CAPS {_quote(caps)}")
    return 1 - penalty, ("; ".join(issues) if issues else "no spam signals")


def _repetition(body: str, words: list[str]) -> float:
    """Share of repeated content: max of duplicate-line share and duplicate word-4-gram share."""
    lines = [ln.strip().lower() for ln in body.splitlines() if ln.count(" ") >= 2]
    line_dup = (len(lines) - len(set(lines))) / len(lines) if lines else 0.0
    grams = list(zip(words, words[1:], words[2:], words[3:], strict=False))
    gram_dup = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    return max(line_dup, gram_dup)


def _clean_format(body: str, subject: str, body_words: list[str]) -> tuple[float, str]:
    """1 - penalties: leaked markup .5; role header, JSON, non-printables .3 each;
    "Subject:" in the body, placeholders .25 each; repetition up to .8."""
    both = subject + "\n" + body
    checks = (
        (0.5, _MARKUP_RE.search(both), "leaked markup"),
        (0.3, _ROLE_RE.search(both), "role header"),
        (0.3, _JSON_RE.search(both), "JSON syntax"),
        (0.3, _NONPRINT_RE.search(both), None),
        (0.25, _SUBJECT_IN_BODY_RE.search(body), "'Subject:' in body"),
        (0.25, _PLACEHOLDER_RE.search(both), "unfilled placeholder"),
    )
    penalty, issues = 0.0, []
    for p, m, label in checks:
        if m:
            penalty += p
            issues.append(f"{label} '{m.group(0).strip()[:20]}'" if label else "non-printable chars")
    rep = _repetition(body, body_words)
    if rep > 0.05:
        penalty += min(0.8, rep)
        issues.append(f"repeated text {rep:.0%}")
    return 1 - penalty, ("; ".join(issues) if issues else "clean")


# --------------------------------------------------------------------------- entry point


@weave.op
@traced
def score_email(
    email: Email, prospect: Prospect, product: Product, weights: RubricWeights = DEFAULT_WEIGHTS
) -> RubricScore:
    """Score `email` for `prospect` and `product`; never raises on any subject/body string.

    total = email_form x (weighted mean of the other parts): the weighted parts say how good
    an email is, the gate says whether it is an email to this prospect at all, so that
    "no spam, no invented names" is only worth something in a real email.
    """
    subject = email.subject if isinstance(email.subject, str) else ""
    body = email.body if isinstance(email.body, str) else ""
    content = _MARKUP_RE.sub(" ", body)  # the prose without leaked markup, for the content parts
    text = subject + "\n" + body
    body_words = _words(body)
    text_words = _words(subject) + body_words
    content_words = _words(subject) + _words(content)
    facts = _Facts(prospect, product)

    raw: dict[str, tuple[float, str]] = {
        "personalization": _personalization(set(content_words), text.lower(), prospect),
        "call_to_action": _call_to_action(content, product),
        "length": _length(len(_TOKEN_RE.findall(content))),
        "subject": _subject(subject),
    }
    if not body_words:
        for name in ("no_hallucination", "no_spam", "clean_format"):
            raw[name] = (0.0, "empty body, nothing to credit")
    else:
        raw["no_hallucination"] = _no_hallucination(text, facts)
        raw["no_spam"] = _no_spam(text, _joined(text_words), facts)
        raw["clean_format"] = _clean_format(body, subject, body_words)

    form = email_form(body, prospect, product, facts.names_word)
    gate = RubricPart(
        name=GATE,
        score=_clip(form.score),
        weight=0.0,
        gate=True,
        explanation=f"gate x{form.score:.2f}: {form.explanation}",
    )
    weighted = [
        RubricPart(name=n, score=_clip(raw[n][0]), weight=getattr(weights, n), explanation=raw[n][1])
        for n in WEIGHTED_PARTS
    ]
    mean = sum(p.score * p.weight for p in weighted) / sum(p.weight for p in weighted)
    return RubricScore(parts=[gate, *weighted], total=min(1.0, max(0.0, gate.score * mean)))
