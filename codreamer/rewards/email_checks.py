"""The ``email_form`` gate's checks other than prose: ``format``, ``not_chatter``,
``addressed`` and ``frame``.

Leaked JSON, role headers, markup and template placeholders; the assistant talking instead of
writing (tool names, refusals, plans, advice, its prompt echoed back); the email written for
someone else (another name greeted, another company named, the prospect in the third person);
and the frame of a letter (greeting, sign-off, a "you" and an "I/we"). Each returns
``(factor, reasons)``; see `codreamer.rewards.email_form` for how the factors combine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from codreamer.agent.prompts import system_prompt, user_message
from codreamer.domain import Product, Prospect
from codreamer.rewards.email_text import (
    FUNCTION_WORDS,
    ORG_SUFFIXES,
    SENTENCE_END_RE,
    WORD_CHARS_RE,
    Token,
    ramp,
    trigrams,
)

__all__ = ["addressed", "chatter", "find_greeting", "format_factor", "frame", "strip_leaks"]

_SECOND_PERSON = frozenset("you your you're yours you've you'd you'll yourself yourselves".split())
_FIRST_PERSON = frozenset("i i'm i've i'd i'll me my we we're we've we'd we'll us our".split())
_GREETINGS = frozenset("hi hello hey dear greetings hiya howdy morning afternoon evening good".split())
_GENERIC_ADDRESSEES = frozenset(
    """
    there team all everyone everybody folks friend friends sir madam colleague colleagues
    sales revenue ops leader leaders manager hiring
    """.split()
)
_HONORIFICS = frozenset("mr mrs ms miss mx dr prof".split())
_SIGNOFF_RE = re.compile(
    r"^\s*(?:best|regards|kind regards|warm regards|best regards|all the best|thanks|thank you|"
    r"many thanks|cheers|sincerely|warmly|talk soon|speak soon|yours|respectfully)\b",
    re.I,
)

_JSON_KEY_RE = re.compile(r"\"\s*\w+\s*\"\s*:")
_ROLE_RE = re.compile(r"(?im)^[ \t]*(?:assistant|user|system|tool)\s*:")
_MARKUP_RE = re.compile(r"</?\s*[a-z_]{2,20}\s*/?>|<\|[^|>\n]{0,40}\|>|```", re.I)
_PLACEHOLDER_RE = re.compile(r"\[[A-Za-z][A-Za-z _'’\-]{1,30}\]|\{\{[^{}\n]{1,30}\}\}")

# The assistant talking, not writing: decisive on its own.
_STRONG_CHATTER_RE = re.compile(
    r"\b[a-z]+_[a-z_]+\b"  # tool names, prospect_id, ...
    r"|\bas an? (?:ai|language model|assistant)\b|\blanguage model\b"
    r"|\bi(?:'|’)?m sorry\b|\bi am sorry\b|\bi apologi[sz]e\b"
    r"|\bi (?:can(?:'|’)?t|cannot|can not|am unable to|(?:'|’)m unable to|won(?:'|’)?t be able to) "
    r"(?:help|assist|do|write|comply|complete|provide|fulfil|fulfill)"
    r"|\bhere(?:'|’)?s (?:the|an|a|your|my) (?:email|draft|outreach|message|response)"
    r"|\bhere is (?:the|an|a|your|my) (?:email|draft|outreach|message|response)"
    r"|\b(?:tool|function) calls?\b|\bsystem prompt\b",
    re.I,
)
# Signs of chatter that a real email rarely has; each costs a lot, two are decisive.
_CHATTER_RES = (
    re.compile(
        r"^\s*(?:sure|certainly|of course|okay|ok|alright|absolutely|got it|understood|great|no problem|"
        r"(?:great|good) question)\b\s*[!,.:]",
        re.I,
    ),
    re.compile(
        r"\b(?:i will|i(?:'|’)ll|i am going to|i(?:'|’)m going to|let me|i need to|i should|i must|"
        r"first,? i|next,? i|then,? i|now,? i)\s+(?:\w+\s+){0,2}?"
        r"(?:look up|look into|lookup|research\w*|search\w*|gather\w*|fetch\w*|finali[sz]\w*|compos\w*|"
        r"draft\w*|writ\w*|craft\w*|call the|use the|check the|find (?:out|the|some)|start by|begin by|"
        r"get (?:the|some|more) (?:facts|info|information|details))",
        re.I,
    ),
    re.compile(
        r"\bthe (?:prospect|recipient|task|instructions?|prompt|facts|rules|user|assistant)\b"
        r"|\b(?:a|an|the|this|my) (?:first |short |personali[sz]ed |cold )?(?:outreach|cold) email\b"
        r"|\bemail draft\b|\bpersonali[sz]ed (?:email|message|outreach)\b"
        r"|\b(?:this|the|my) (?:email|message|draft) (?:introduces|highlights|mentions|references|will|should|"
        r"would|includes|is (?:addressed|written|personali[sz]ed|for))\b"
        r"|\bprospect\s*:|\bproduct\s*:|\brules\s*:",
        re.I,
    ),
    re.compile(
        r"\b(?:writ(?:e|ten|ing)|draft(?:ed|ing)?|compos(?:e|ed|ing)|craft(?:ed|ing)?|finali[sz](?:e|ed|ing)|"
        r"sen(?:d|t|ding)) (?:a|an|the|this|my) (?:\w+ ){0,3}(?:email|message)\b",
        re.I,
    ),
    re.compile(r"\b(?:under|at most|no more than|fewer than) \d+ words\b|\bsign (?:as|off as)\b", re.I),
    re.compile(
        r"\b(?:put together|prepare|create|write up) (?:a|an|the|this|my) (?:\w+ ){0,2}(?:message|email|note|draft)\b"
        r"|\btell me (?:more|about)\b|\b(?:provide|give|share with) me\b|\bonce i have\b|\bif you (?:can )?provide\b",
        re.I,
    ),
    re.compile(  # advice on how to write it, instead of writing it
        r"\byou (?:should|could|might|can|may want to|need to|want to) (?:mention|reference|highlight|include|"
        r"open with|start with|close with|end with|focus on|emphasi[sz]e|personali[sz]e|cite|address)\b"
        r"|\b(?:call to action|subject line|opening line)\b",
        re.I,
    ),
)


def strip_leaks(body: str) -> str:
    """`body` with leaked markup and template placeholders blanked out: the text the other
    checks read."""
    return _PLACEHOLDER_RE.sub(" ", _MARKUP_RE.sub(" ", body))


def format_factor(body: str) -> tuple[float, list[str]]:
    """Leaked JSON, a role header, leaked markup, an unfilled placeholder; (factor, reasons)."""
    reasons: list[str] = []
    fmt = 1.0
    json_keys = len(_JSON_KEY_RE.findall(body))
    if json_keys >= 2 or (body.strip() and body.lstrip()[0] in "{["):
        fmt *= 0.05
        reasons.append("leaked JSON")
    if _ROLE_RE.search(body):
        fmt *= 0.3
        reasons.append("role header")
    if markup := _MARKUP_RE.search(body):
        fmt *= 0.5
        reasons.append(f"leaked markup '{markup.group(0)[:20]}'")
    if placeholder := _PLACEHOLDER_RE.search(body):
        fmt *= 0.4
        reasons.append(f"unfilled template placeholder '{placeholder.group(0)[:20]}'")
    return fmt, reasons


@lru_cache(maxsize=256)
def _prompt_trigrams(prompt_text: str) -> frozenset[tuple[str, str, str]]:
    return frozenset(trigrams(WORD_CHARS_RE.findall(prompt_text.lower())))


def _prompt_text(prospect: Prospect, product: Product) -> str:
    """The agent's instructions minus the names and the product's own sentences (an email may
    quote those, and they would make every signature look like an echo)."""
    text = system_prompt(product) + "\n" + user_message(prospect, product)
    own = (
        product.one_liner, product.call_to_action, product.sender_title, product.sender_name, product.name,
        prospect.full_name, prospect.company.name,
    )  # fmt: skip
    for phrase in sorted(own, key=len, reverse=True):
        if phrase:
            text = text.replace(phrase, "\n")
    return text


def chatter(text: str, words: list[str], prospect: Prospect, product: Product) -> tuple[float, list[str]]:
    """1 for an email; low when the assistant talks about its task or echoes its prompt."""
    reasons: list[str] = []
    factor = 1.0
    m = _STRONG_CHATTER_RE.search(text)
    if m:
        factor *= 0.05
        reasons.append(f"assistant talk '{m.group(0)[:30]}'")
    hits = [h.group(0) for r in _CHATTER_RES if (h := r.search(text))]
    if hits:
        factor *= 0.3 ** len(hits)
        reasons.append("chatter " + ", ".join(f"'{h.strip()[:30]}'" for h in hits))
    prompt = _prompt_trigrams(_prompt_text(prospect, product))
    mine = trigrams(words)
    if prompt and mine:
        echo = len(mine & prompt) / len(mine)
        if echo > 0.12:
            factor *= max(0.03, ramp(echo, 0.4, 0.12))
            reasons.append(f"echoes the prompt ({echo:.0%} of its word triples)")
    return factor, reasons


def _proper_nouns(lines: list[list[Token]], known: Callable[[str], bool], skip_lines: set[int]) -> list[str]:
    """Capitalised names the facts do not know, with evidence that they name something.

    Mid-sentence capitalised words that are neither facts nor common words, or a name that
    starts a sentence but repeats, is possessive, is followed by another capitalised word,
    or ends in an organisation suffix ("Labs", "Health"). An ALL-CAPS word may be shouting, so
    it counts only when possessive, after "at", before an organisation suffix, or repeated.
    """
    counts: dict[str, int] = {}
    evidence: set[str] = set()
    for i, toks in enumerate(lines):
        if i in skip_lines:
            continue
        prev: Token | None = None
        for j, t in enumerate(toks):
            w = t.word
            if w and w[:1].isupper() and w.isalpha() and len(w) > 1 and not known(w):
                counts[w] = counts.get(w, 0) + 1
                sentence_start = prev is None or bool(SENTENCE_END_RE.search(prev.raw)) or prev.raw[-1:] in ':"“'
                nxt = toks[j + 1].word if j + 1 < len(toks) else ""
                if (
                    (not sentence_start and not w.isupper())
                    or re.search(r"['’]s\b", t.raw)
                    or (nxt[:1].isupper() and not nxt.isupper() and not SENTENCE_END_RE.search(t.raw))
                    or nxt.lower() in ORG_SUFFIXES
                    or (prev is not None and prev.low == "at")
                ):
                    evidence.add(w)
            prev = t
    return [w for w, c in counts.items() if w in evidence or c >= 2]


def find_greeting(
    lines: list[list[Token]], prospect: Prospect, product: Product, known: Callable[[str], bool]
) -> tuple[str, int]:
    """(kind, line index) of the greeting in the first two lines that have words.

    Kind: "name" (the prospect's first or last name: "Hi Grace,", "Dear Ms. Schneider,",
    "Grace,"), "generic" ("Hi there,", "Hello team,"), "none", or "wrong:<Name>" (another
    person: another prospect, or the sender greeting themself).
    """
    first, last = prospect.first_name.strip().lower(), prospect.last_name.strip().lower()
    sender_first = (product.sender_name.split() or [""])[0].lower()
    for i in [i for i, toks in enumerate(lines) if any(t.word for t in toks)][:2]:
        toks = [t for t in lines[i] if t.word]
        if toks[0].low == "subject":
            continue
        k = 0
        while k < len(toks) and k < 3 and toks[k].low in _GREETINGS:
            k += 1
        if k and k < len(toks) and not SENTENCE_END_RE.search(toks[k - 1].raw):
            names = []
            for t in toks[k : k + 3]:
                if t.low in _HONORIFICS:
                    continue
                names.append(t)
                if t.raw[-1:] in ",:;!.—-" or not t.word[:1].isupper():
                    break
            lows = [t.low for t in names]
            if first in lows or last in lows:
                return "name", i
            if not names or lows[0] in _GENERIC_ADDRESSEES:
                return "generic", i
            if lows[0] == sender_first:
                return "wrong:" + names[0].word, i
            if names[0].word[:1].isupper():
                return ("generic" if known(names[0].word) else "wrong:" + names[0].word), i
            if names[0].raw[-1:] in ",:!" and lows[0] not in FUNCTION_WORDS and not known(lows[0]):
                return "wrong:" + names[0].word, i  # "hi farid," in lowercase
            return "generic", i
        if k:
            return "generic", i
        if 1 <= len(toks) <= 3 and toks[-1].raw[-1:] in ",:—-!" and all(t.word[:1].isupper() for t in toks):
            lows = [t.low for t in toks if t.low not in _HONORIFICS]  # a name alone: "Grace," / "Farid Thompson:"
            if first in lows or last in lows:
                return "name", i
            if lows and (lows[0] == sender_first or not known(toks[-1].word)):
                return "wrong:" + " ".join(t.word for t in toks), i
        return "none", i
    return "none", -1


def addressed(
    lines: list[list[Token]],
    text_low: str,
    prospect: Prospect,
    known: Callable[[str], bool],
    greeting: tuple[str, int],
) -> tuple[float, list[str]]:
    """Written to THIS prospect: not greeting someone else, not about another company, not
    talking about the prospect in the third person. Returns (factor, reasons)."""
    kind, greet_line = greeting
    first, last = prospect.first_name.strip().lower(), prospect.last_name.strip().lower()
    reasons: list[str] = []
    factor = 1.0
    if kind.startswith("wrong:"):
        factor *= 0.05
        reasons.append(f"greets '{kind[6:]}', not {prospect.first_name}: written for someone else")

    about = re.search(
        rf"\b(?:{re.escape(first)}|{re.escape(last)})(?:['’]s)?\s+(?:is|has|was|wants|needs|works|leads|runs|"
        r"struggles|said|seems|will|would|might|could|should|may|must|manages|oversees|faces|cares)\b"
        r"|\b(?:she|he)\s+(?:is|has|was|wants|needs|works|leads|runs|struggles|said|seems|manages|oversees|faces)\b",
        text_low,
    )
    if about:
        factor *= 0.3
        reasons.append(f"talks about {prospect.first_name} ('{about.group(0)}'), not to them")
    elif kind == "none" and (pronoun := re.search(r"\b(?:she|her|hers|he|him|his)\b", text_low)):
        factor *= 0.4
        reasons.append(f"no greeting and talks about someone ('{pronoun.group(0)}'), not to them")

    company = prospect.company.name.strip().lower()
    head = next((w for w in WORD_CHARS_RE.findall(company) if len(w) >= 4), "")
    if not (company in text_low or (head and re.search(rf"\b{re.escape(head)}", text_low))):
        others = _proper_nouns(lines, known, {greet_line} if kind != "none" else set())
        if others:
            factor *= 0.05
            named = ", ".join(others[:3])
            reasons.append(f"names {named} but not {prospect.company.name}: written for another company")
        else:
            factor *= 0.6
            reasons.append(f"{prospect.company.name} not named")
    return factor, reasons


def frame(lines: list[list[Token]], greeting: str, words: set[str], product: Product) -> tuple[float, list[str]]:
    """Greeting, sign-off, a reader ("you") and a writer ("I"/"we")."""
    reasons: list[str] = []
    factor = 1.0
    if greeting == "none":
        factor *= 0.6
        reasons.append("no greeting")
    elif greeting == "generic":
        factor *= 0.85
        reasons.append("greeting without the prospect's name")
    nonempty = [" ".join(t.raw for t in toks) for toks in lines if any(t.word for t in toks)]
    tail = nonempty[-4:]
    sender = [w.lower() for w in WORD_CHARS_RE.findall(product.sender_name)]
    tail_words = [t.lower() for t in WORD_CHARS_RE.findall(" ".join(tail))][-8:]
    signed = any(_SIGNOFF_RE.search(line) for line in tail) or any(
        re.search(r"\b(?:best|regards|thanks|cheers|sincerely|warmly)\b[,.!]?\s*$", line, re.I) for line in tail
    )
    named = bool(sender) and sender[0] in tail_words
    if not (signed or named):
        factor *= 0.75
        reasons.append("no sign-off")
    if not words & _SECOND_PERSON:
        if words & _FIRST_PERSON:
            factor *= 0.85
            reasons.append("never says 'you'")
        else:
            factor *= 0.3
            reasons.append("no 'you' and no 'I/we': not written to anyone")
    return factor, reasons
