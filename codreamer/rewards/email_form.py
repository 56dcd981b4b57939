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

Everything here is pure and total: any string gives a score, nothing raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from codreamer.agent.prompts import system_prompt, user_message
from codreamer.domain import Product, Prospect

__all__ = ["EmailForm", "email_form"]

# Closed-class English words: the glue of real sentences. Word salad has almost none.
_FUNCTION = frozenset(
    """
    a an the this that these those my your our their his her its i me we us you he him she they
    them it of in on at by for with from to into onto about over under after before between
    through during without within than as and or but nor so if when while because although
    is are was were be been being am do does did have has had will would can could should shall
    may might must not no there here what which who whom whose why how all any each every some
    such only just also very too then now up out more most other another same own both either
    """.split()
)
# Function-word classes and the classes (or words) that cannot follow each one: "the of",
# "with and", "we the", "would in", "is are". Real prose almost never has these pairs; a
# shuffled or sampled text has several per 100 words. Pairs that English does produce were
# left out ("instead of on", "in about two weeks", "do not have", "and of course").
_CLASS_WORDS = {
    "DET": "the a an your our my their its every",
    "DEM": "this that these those",
    "PREP": "of in on at by for with from into about over under between through during without within",
    "THAN": "than",
    "TO": "to",
    "SUBJ": "i we they he she",
    "OBJ": "me us them him",
    "BE": "is are was were am",
    "BE0": "be been",
    "DO": "do does did",
    "HAVE": "have has had",
    "MODAL": "will would can could should shall may might must",
    "CONJ": "and or but nor",
    "NEG": "not",
}
_CLASS = {w: c for c, words in _CLASS_WORDS.items() for w in words.split()}
_BAD_AFTER: dict[str, tuple[frozenset[str], frozenset[str]]] = {  # class -> (bad classes, bad words)
    k: (frozenset(classes.split()), frozenset(words.split()))
    for k, classes, words in (
        ("DET", "DET DEM PREP THAN TO SUBJ OBJ BE BE0 DO HAVE MODAL CONJ NEG",
         "you it if so when where which who whom why how as because while although what whose also then there "
         "here all any some each both either another such just too"),
        ("PREP", "THAN TO SUBJ BE DO HAVE MODAL CONJ", "of by for with from into"),
        ("TO", "TO SUBJ BE MODAL CONJ THAN", "of in on at by for with from into has had does did"),
        ("SUBJ", "DET DEM SUBJ OBJ TO THAN CONJ", "you it"),
        ("OBJ", "SUBJ MODAL BE", ""),
        ("BE", "BE DO HAVE MODAL THAN", "be been"),
        ("BE0", "BE BE0 DO HAVE MODAL SUBJ", ""),
        ("DO", "BE DO MODAL", ""),
        ("HAVE", "BE DO MODAL", ""),
        ("MODAL", "MODAL PREP TO CONJ BE THAN OBJ", ""),
        ("CONJ", "CONJ THAN", ""),
        ("NEG", "BE MODAL", "does did"),
        ("THAN", "CONJ MODAL", ""),
    )
}  # fmt: skip
# Subject-verb pairs that never agree.
_BAD_AGREEMENT = frozenset(
    ("i", v) for v in ("is", "are", "were", "has", "does")
) | frozenset((s, v) for s in ("we", "they") for v in ("is", "am", "was", "has", "does")) | frozenset(
    (s, v) for s in ("he", "she") for v in ("are", "am", "were", "have", "do")
)
_DETERMINERS = frozenset(_CLASS_WORDS["DET"].split())
_CONJUNCTIONS = frozenset(_CLASS_WORDS["CONJ"].split())
_MODALS = _CLASS_WORDS["MODAL"]


def _bad_pair(p: str, c: str) -> bool:
    """True when the function word `p` cannot be followed by the (lowercase) word `c`."""
    rule = _BAD_AFTER.get(_CLASS.get(p, ""))
    if rule is None:
        return False
    if p == "of" and c in ("in", "on", "at", "by", "for", "with", "from", "into"):
        return False  # "instead of on Friday", "ahead of in-person"
    return _CLASS.get(c) in rule[0] or c in rule[1] or (p, c) in _BAD_AGREEMENT


# Words a sentence never ends on.
_NEVER_FINAL = _DETERMINERS | _CONJUNCTIONS | frozenset(
    f"of to from into than at by as if because although while when which whose i we they he she is are was were am "
    f"very not no every each both {_MODALS}".split()
)
# Capitalised mid-sentence only in a shuffle: function words and greeting/sign-off words ("I" aside).
_NOT_CAPITAL_MID = (_FUNCTION - {"i", "may"}) | frozenset(
    "hi hello hey dear best regards thanks cheers congrats congratulations sincerely warmly".split()
)
_MONTHS_DAYS = frozenset(
    """
    january february april june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday
    """.split()
)  # "may" and "march" are also common words
_ABBREVIATIONS = frozenset("e.g. i.e. etc. vs. approx. min. mins. no. inc. co. ltd. mr. mrs. ms. dr. st.".split())
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
_ORG_SUFFIXES = frozenset(
    """
    labs lab inc corp corporation co ltd llc gmbh group systems security health insurance freight
    logistics bank capital partners technologies technology solutions software analytics
    networks holdings industries foods motors energy robotics ai
    """.split()
)

_LINE_TOKEN_RE = re.compile(r"\S+")
_CORE_RE = re.compile(r"^[\"'“‘(\[*_<>-]*(.*?)[\"'”’)\].,!?;:…*_<>-]*$")
_WORD_CHARS_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_TOKEN_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:[-'’][A-Za-z0-9]+)*")
_SENTENCE_END_RE = re.compile(r"[.!?…][\"'”’)\]]*$")
_LIST_NUMBER_RE = re.compile(r"\d{1,2}[.)]$")
_URLISH_RE = re.compile(r"[@/]|\w\.\w")  # e-mail addresses, URLs, "i.e."
_SYMBOL_RE = re.compile(r"[{}\[\]<>|\\_#*=~^`\"@]")
_JSON_KEY_RE = re.compile(r"\"\s*\w+\s*\"\s*:")
_ROLE_RE = re.compile(r"(?im)^[ \t]*(?:assistant|user|system|tool)\s*:")
_MARKUP_RE = re.compile(r"</?\s*[a-z_]{2,20}\s*/?>|<\|[^|>\n]{0,40}\|>|```", re.I)
_PLACEHOLDER_RE = re.compile(r"\[[A-Za-z][A-Za-z _'’\-]{1,30}\]|\{\{[^{}\n]{1,30}\}\}")
_LOREM_RE = re.compile(r"\blorem\s+ipsum\b|\bdolor\s+sit\s+amet\b", re.I)

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


@dataclass(frozen=True)
class EmailForm:
    """The gate and why: `score` in [0, 1], `explanation` for a human, `factors` for debugging."""

    score: float
    explanation: str
    factors: dict[str, float]


@dataclass(frozen=True)
class _Token:
    raw: str
    word: str  # the alphanumeric core, original case ("" for pure punctuation)
    low: str


def _tokens(line: str) -> list[_Token]:
    out = []
    for raw in _LINE_TOKEN_RE.findall(line):
        m = _CORE_RE.match(raw)
        core = m.group(1) if m else raw
        w = _TOKEN_WORD_RE.search(core)
        word = core if w and w.group(0) == core else (w.group(0) if w else "")
        out.append(_Token(raw, word, word.lower().replace("’", "'")))
    return out


def _logical_lines(text: str) -> list[str]:
    """Lines, with hard-wrapped prose joined back: a line of 6+ words that does not end a
    sentence continues on the next line, unless that one is empty or a bullet."""
    out: list[str] = []
    for line in text.splitlines():
        prev = out[-1] if out else ""
        if (
            line.strip()
            and len(prev.split()) >= 6
            and not _SENTENCE_END_RE.search(prev.rstrip())
            and line.lstrip()[:1] not in "-*•"
        ):
            out[-1] = prev.rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out


def _ramp(x: float, zero: float, one: float) -> float:
    """0 at `zero`, 1 at `one`, linear between (works for either direction)."""
    t = (x - zero) / (one - zero)
    return min(1.0, max(0.0, t))


def _trigrams(words: list[str]) -> set[tuple[str, str, str]]:
    return set(zip(words, words[1:], words[2:], strict=False))


@lru_cache(maxsize=256)
def _prompt_trigrams(prompt_text: str) -> frozenset[tuple[str, str, str]]:
    return frozenset(_trigrams(_WORD_CHARS_RE.findall(prompt_text.lower())))


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


# --------------------------------------------------------------------------- factors


def _proper_names(prospect: Prospect, product: Product) -> frozenset[str]:
    """Lowercased names that a written email capitalises: people, company, places, product, months."""
    texts = [
        prospect.first_name, prospect.last_name, prospect.company.name, prospect.company.headquarters,
        product.name, product.sender_name,
    ]  # fmt: skip
    news = prospect.company.recent_news
    caps = [w for w in _WORD_CHARS_RE.findall(news) if w[:1].isupper()]
    words = {w.lower() for text in texts for w in _WORD_CHARS_RE.findall(text)} | {w.lower() for w in caps}
    generic = _FUNCTION | _ORG_SUFFIXES | {"may", "march"}
    return frozenset(w for w in words | _MONTHS_DAYS if len(w) >= 3 and w not in generic and not w.isdigit())


def _order_errors(lines: list[list[_Token]], words: list[_Token], proper: frozenset[str]) -> list[str]:
    """Word-order and casing errors, quoted: real prose has ~0 per 100 words, a shuffle ~10+.

    - a pair that cannot occur: a determiner, preposition, conjunction, subject pronoun,
      modal or form of "be" followed by a word that cannot follow it ("the of", "with and",
      "we the", "would in", "is are"), or a determiner before a comma or sentence end;
    - a sentence that ends on a word that never ends one ("the.", "and.", "of.", "we.");
    - a sentence or line that starts in lowercase; a lowercase "i";
    - a capitalised function or greeting word mid-sentence ("with The", "deal Congrats");
      a capital "A" mid-sentence is a letter ("Series A"), not an error;
    - the prospect's names in lowercase ("maya", "berlin"): words shuffled and re-cased.
    """
    errors = [f"'{t.word}'" for t in words if t.low in proper and t.word.islower() and not _URLISH_RE.search(t.raw)]
    for toks in lines:
        prev: _Token | None = None
        prev_mid = False  # prev was not the first word of a sentence
        for k, t in enumerate(toks):
            if not t.word:
                continue
            ends = bool(_SENTENCE_END_RE.search(t.raw)) and t.raw.lower() not in _ABBREVIATIONS
            lowercase_i = t.word == "i" and not _URLISH_RE.search(t.raw)
            if lowercase_i or (ends and t.word.islower() and t.low in _NEVER_FINAL):
                errors.append(f"'{t.raw}'")
            if prev is None:
                bullet = k > 0 or t.raw[:1] in "-*•" or t.word[:1].isdigit()
                if t.word[:1].islower() and not bullet and not _URLISH_RE.search(t.raw):
                    errors.append(f"'{t.raw}' starts a line")
            else:
                p, c = prev.low, t.low
                prev_ends = (
                    bool(_SENTENCE_END_RE.search(prev.raw))
                    and prev.raw.lower() not in _ABBREVIATIONS
                    and not _LIST_NUMBER_RE.match(prev.raw)  # "1. generate"
                )
                prev_breaks = prev.raw[-1:] in ",;:" or prev_ends
                letter = prev.word == "A" and prev_mid  # "Series A in January"
                if p in _DETERMINERS and prev_breaks and not letter:
                    errors.append(f"'{prev.raw} {t.raw}'")
                elif not prev_breaks and not letter and t.word.islower() and _bad_pair(p, c):
                    errors.append(f"'{prev.raw} {t.raw}'")
                if prev_ends and t.word[:1].islower() and not _URLISH_RE.search(t.raw):
                    errors.append(f"'{prev.raw} {t.raw}'")
                elif (
                    not prev_ends
                    and prev.raw[-1:] not in ":;\"“(-—–"
                    and not (prev.raw[-1:] == "," and k <= 3)  # "Hi Grace, Congrats on ..."
                    and t.word[:1].isupper()
                    and c in _NOT_CAPITAL_MID
                    and t.word != "A"
                ):
                    errors.append(f"'{prev.raw} {t.raw}'")
            prev_mid = prev is not None and not (bool(_SENTENCE_END_RE.search(prev.raw)) or prev.raw[-1:] == ":")
            prev = t
    return errors


def _prose(
    lines: list[list[_Token]], words: list[_Token], text: str, proper: frozenset[str]
) -> tuple[float, list[str]]:
    """English prose in order; returns (factor, reasons)."""
    n = len(words)
    reasons: list[str] = []

    stop = sum(t.low in _FUNCTION for t in words) / n
    f_stop = _ramp(stop, 0.12, 0.26)
    if f_stop < 1:
        reasons.append(f"few function words ({stop:.0%})")

    # Sentences: chunks split at sentence ends and line ends. Unterminated short lines are fine
    # at the top (greeting) and bottom (sign-off, name, title); anywhere else they are not prose.
    ok_words = 0
    nonempty = [i for i, toks in enumerate(lines) if any(t.word for t in toks)]
    head, tail = set(nonempty[:2]), set(nonempty[-4:])
    for i, toks in enumerate(lines):
        chunk: list[_Token] = []
        for j, t in enumerate(toks):
            chunk.append(t)
            last = j == len(toks) - 1
            if _SENTENCE_END_RE.search(t.raw) or last:
                n_chunk = sum(bool(c.word) for c in chunk)
                terminated = bool(_SENTENCE_END_RE.search(t.raw))
                short_frame = not terminated and n_chunk <= 5 and last and (i in head or i in tail)
                bullet = toks[0].raw[:1] in "-*•" or _LIST_NUMBER_RE.match(toks[0].raw) is not None
                short_frame = short_frame or (bullet and last and n_chunk <= 25)
                if (terminated and 2 <= n_chunk <= 40) or short_frame or (terminated and n_chunk == 1 and i in tail):
                    ok_words += n_chunk
                chunk = []
    sentence_share = ok_words / n
    f_sent = _ramp(sentence_share, 0.35, 0.75)
    if f_sent < 1:
        reasons.append(f"only {sentence_share:.0%} of words in sentences")

    # Word order: what English does not produce and a shuffled text is full of.
    errors = _order_errors(lines, words, proper)
    rate = len(errors) / max(n, 30)  # one slip in a 10-word text is not a shuffle
    f_order = _ramp(rate, 0.055, 0.012)
    if f_order < 1:
        reasons.append(f"word order broken ({len(errors)} errors in {n} words: {', '.join(errors[:3])})")

    # Repetition and diversity.
    lows = [t.low for t in words]
    grams = list(zip(lows, lows[1:], lows[2:], lows[3:], strict=False))
    rep = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    distinct = len(set(lows)) / n
    f_rep = _ramp(rep, 0.35, 0.05)
    if n >= 30:
        f_rep *= _ramp(distinct, 0.15, 0.35)
    if f_rep < 1:
        reasons.append(f"repeated text ({rep:.0%} repeated 4-grams, {distinct:.0%} distinct words)")

    # Symbols and tokens that are not words.
    chars = sum(not ch.isspace() for ch in text) or 1
    sym = len(_SYMBOL_RE.findall(text)) / chars
    odd = sum(len(t.word) > 18 or (len(t.word) > 3 and not re.search(r"[aeiouyAEIOUY0-9]", t.word)) for t in words) / n
    f_sym = _ramp(sym, 0.08, 0.02) * _ramp(odd, 0.25, 0.05)
    if f_sym < 1:
        reasons.append(f"symbols/non-words ({sym:.0%} symbols, {odd:.0%} odd tokens)")

    if _LOREM_RE.search(text):
        reasons.append("lorem ipsum")
        return 0.0, reasons
    return f_stop * f_sent * f_order * f_rep * f_sym, reasons


def _chatter(text: str, words: list[str], prospect: Prospect, product: Product) -> tuple[float, list[str]]:
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
    mine = _trigrams(words)
    if prompt and mine:
        echo = len(mine & prompt) / len(mine)
        if echo > 0.12:
            factor *= max(0.03, _ramp(echo, 0.4, 0.12))
            reasons.append(f"echoes the prompt ({echo:.0%} of its word triples)")
    return factor, reasons


def _proper_nouns(lines: list[list[_Token]], known: Callable[[str], bool], skip_lines: set[int]) -> list[str]:
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
        prev: _Token | None = None
        for j, t in enumerate(toks):
            w = t.word
            if w and w[:1].isupper() and w.isalpha() and len(w) > 1 and not known(w):
                counts[w] = counts.get(w, 0) + 1
                sentence_start = prev is None or bool(_SENTENCE_END_RE.search(prev.raw)) or prev.raw[-1:] in ":\"“"
                nxt = toks[j + 1].word if j + 1 < len(toks) else ""
                if (
                    (not sentence_start and not w.isupper())
                    or re.search(r"['’]s\b", t.raw)
                    or (nxt[:1].isupper() and not nxt.isupper() and not _SENTENCE_END_RE.search(t.raw))
                    or nxt.lower() in _ORG_SUFFIXES
                    or (prev is not None and prev.low == "at")
                ):
                    evidence.add(w)
            prev = t
    return [w for w, c in counts.items() if w in evidence or c >= 2]


def _greeting(
    lines: list[list[_Token]], prospect: Prospect, product: Product, known: Callable[[str], bool]
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
        if k and k < len(toks) and not _SENTENCE_END_RE.search(toks[k - 1].raw):
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
            if names[0].raw[-1:] in ",:!" and lows[0] not in _FUNCTION and not known(lows[0]):
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


def _addressed(
    lines: list[list[_Token]],
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
    head = next((w for w in _WORD_CHARS_RE.findall(company) if len(w) >= 4), "")
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


def _frame(lines: list[list[_Token]], greeting: str, words: set[str], product: Product) -> tuple[float, list[str]]:
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
    sender = [w.lower() for w in _WORD_CHARS_RE.findall(product.sender_name)]
    tail_words = [t.lower() for t in _WORD_CHARS_RE.findall(" ".join(tail))][-8:]
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


# --------------------------------------------------------------------------- entry point


def email_form(body: str, prospect: Prospect, product: Product, known: Callable[[str], bool]) -> EmailForm:
    """The gate for `body` (the email text, leaked markup included); never raises.

    `known(word)` says whether a word is one of the facts or a common word (the rubric's
    `_Facts.names_word`), to tell the prospect's names from someone else's.
    """
    body = body if isinstance(body, str) else ""
    markup = _MARKUP_RE.search(body)
    placeholder = _PLACEHOLDER_RE.search(body)
    content = _PLACEHOLDER_RE.sub(" ", _MARKUP_RE.sub(" ", body))
    lines = [_tokens(line) for line in _logical_lines(content)]
    words = [t for toks in lines for t in toks if t.word]
    if not words:
        return EmailForm(0.0, "no words: not an email", {"words": 0.0})
    factors: dict[str, float] = {}
    reasons: list[str] = []

    n = len(words)
    factors["words"] = _ramp(n, 0, 45)
    if factors["words"] < 1:
        reasons.append(f"only {n} words (full credit from 45)")

    factors["prose"], why = _prose(lines, words, content, _proper_names(prospect, product))
    reasons += why

    fmt = 1.0
    json_keys = len(_JSON_KEY_RE.findall(body))
    if json_keys >= 2 or (body.strip() and body.lstrip()[0] in "{["):
        fmt *= 0.05
        reasons.append("leaked JSON")
    if _ROLE_RE.search(body):
        fmt *= 0.3
        reasons.append("role header")
    if markup:
        fmt *= 0.5
        reasons.append(f"leaked markup '{markup.group(0)[:20]}'")
    if placeholder:
        fmt *= 0.4
        reasons.append(f"unfilled template placeholder '{placeholder.group(0)[:20]}'")
    factors["format"] = fmt

    lows = [t.low for t in words]
    factors["not_chatter"], why = _chatter(content, lows, prospect, product)
    reasons += why

    greeting = _greeting(lines, prospect, product, known)
    factors["addressed"], why = _addressed(lines, content.lower(), prospect, known, greeting)
    reasons += why

    factors["frame"], why = _frame(lines, greeting[0], set(lows), product)
    reasons += why

    score = 1.0
    for value in factors.values():
        score *= value
    score = min(1.0, max(0.0, score))
    if not reasons:
        return EmailForm(score, f"an email to {prospect.first_name} at {prospect.company.name}, signed", factors)
    low = ", ".join(f"{k} {v:.2f}" for k, v in factors.items() if v < 1)
    return EmailForm(score, "; ".join(reasons) + f" ({low})", factors)
