"""The ``prose`` factor of the ``email_form`` gate: English prose in order.

Function-word share, words in sentences, word-order errors (pairs English does not produce,
sentences ending on "the", lowercase sentence starts, capitalised function words
mid-sentence, the prospect's names in lowercase), repetition, symbols and non-words, lorem
ipsum. See `codreamer.rewards.email_form` for how the factors combine.
"""

from __future__ import annotations

import re

from codreamer.domain import Product, Prospect
from codreamer.rewards.email_text import (
    FUNCTION_WORDS,
    ORG_SUFFIXES,
    SENTENCE_END_RE,
    WORD_CHARS_RE,
    Token,
    ramp,
)

__all__ = ["proper_names", "prose"]

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
_BAD_AGREEMENT = (
    frozenset(("i", v) for v in ("is", "are", "were", "has", "does"))
    | frozenset((s, v) for s in ("we", "they") for v in ("is", "am", "was", "has", "does"))
    | frozenset((s, v) for s in ("he", "she") for v in ("are", "am", "were", "have", "do"))
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
_NEVER_FINAL = (
    _DETERMINERS
    | _CONJUNCTIONS
    | frozenset(
        f"of to from into than at by as if because although while when which whose i we they he she is are was were am "
        f"very not no every each both {_MODALS}".split()
    )
)
# Capitalised mid-sentence only in a shuffle: function words and greeting/sign-off words ("I" aside).
_NOT_CAPITAL_MID = (FUNCTION_WORDS - {"i", "may"}) | frozenset(
    "hi hello hey dear best regards thanks cheers congrats congratulations sincerely warmly".split()
)
_MONTHS_DAYS = frozenset(
    """
    january february april june july august september october november december
    monday tuesday wednesday thursday friday saturday sunday
    """.split()
)  # "may" and "march" are also common words
_ABBREVIATIONS = frozenset("e.g. i.e. etc. vs. approx. min. mins. no. inc. co. ltd. mr. mrs. ms. dr. st.".split())
_LIST_NUMBER_RE = re.compile(r"\d{1,2}[.)]$")
_URLISH_RE = re.compile(r"[@/]|\w\.\w")  # e-mail addresses, URLs, "i.e."
_SYMBOL_RE = re.compile(r"[{}\[\]<>|\\_#*=~^`\"@]")
_LOREM_RE = re.compile(r"\blorem\s+ipsum\b|\bdolor\s+sit\s+amet\b", re.I)


def proper_names(prospect: Prospect, product: Product) -> frozenset[str]:
    """Lowercased names that a written email capitalises: people, company, places, product, months."""
    texts = [
        prospect.first_name, prospect.last_name, prospect.company.name, prospect.company.headquarters,
        product.name, product.sender_name,
    ]  # fmt: skip
    news = prospect.company.recent_news
    caps = [w for w in WORD_CHARS_RE.findall(news) if w[:1].isupper()]
    words = {w.lower() for text in texts for w in WORD_CHARS_RE.findall(text)} | {w.lower() for w in caps}
    generic = FUNCTION_WORDS | ORG_SUFFIXES | {"may", "march"}
    return frozenset(w for w in words | _MONTHS_DAYS if len(w) >= 3 and w not in generic and not w.isdigit())


def _order_errors(lines: list[list[Token]], words: list[Token], proper: frozenset[str]) -> list[str]:
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
        prev: Token | None = None
        prev_mid = False  # prev was not the first word of a sentence
        for k, t in enumerate(toks):
            if not t.word:
                continue
            ends = bool(SENTENCE_END_RE.search(t.raw)) and t.raw.lower() not in _ABBREVIATIONS
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
                    bool(SENTENCE_END_RE.search(prev.raw))
                    and prev.raw.lower() not in _ABBREVIATIONS
                    and not _LIST_NUMBER_RE.match(prev.raw)  # "1. generate"
                )
                prev_breaks = prev.raw[-1:] in ",;:" or prev_ends
                letter = prev.word == "A" and prev_mid  # "Series A in January"
                determiner_at_break = p in _DETERMINERS and prev_breaks and not letter  # "the," "the."
                impossible_pair = not prev_breaks and not letter and t.word.islower() and _bad_pair(p, c)
                if determiner_at_break or impossible_pair:
                    errors.append(f"'{prev.raw} {t.raw}'")
                lowercase_start = prev_ends and t.word[:1].islower() and not _URLISH_RE.search(t.raw)
                capital_mid = (
                    not prev_ends
                    and prev.raw[-1:] not in ':;"“(-—–'
                    and not (prev.raw[-1:] == "," and k <= 3)  # "Hi Grace, Congrats on ..."
                    and t.word[:1].isupper()
                    and c in _NOT_CAPITAL_MID
                    and t.word != "A"
                )
                if lowercase_start or capital_mid:
                    errors.append(f"'{prev.raw} {t.raw}'")
            prev_mid = prev is not None and not (bool(SENTENCE_END_RE.search(prev.raw)) or prev.raw[-1:] == ":")
            prev = t
    return errors


def prose(lines: list[list[Token]], words: list[Token], text: str, proper: frozenset[str]) -> tuple[float, list[str]]:
    """English prose in order; returns (factor, reasons)."""
    n = len(words)
    reasons: list[str] = []

    stop = sum(t.low in FUNCTION_WORDS for t in words) / n
    f_stop = ramp(stop, 0.12, 0.26)
    if f_stop < 1:
        reasons.append(f"few function words ({stop:.0%})")

    # Sentences: chunks split at sentence ends and line ends. Unterminated short lines are fine
    # at the top (greeting) and bottom (sign-off, name, title); anywhere else they are not prose.
    ok_words = 0
    nonempty = [i for i, toks in enumerate(lines) if any(t.word for t in toks)]
    head, tail = set(nonempty[:2]), set(nonempty[-4:])
    for i, toks in enumerate(lines):
        chunk: list[Token] = []
        for j, t in enumerate(toks):
            chunk.append(t)
            last = j == len(toks) - 1
            if SENTENCE_END_RE.search(t.raw) or last:
                n_chunk = sum(bool(c.word) for c in chunk)
                terminated = bool(SENTENCE_END_RE.search(t.raw))
                short_frame = not terminated and n_chunk <= 5 and last and (i in head or i in tail)
                bullet = toks[0].raw[:1] in "-*•" or _LIST_NUMBER_RE.match(toks[0].raw) is not None
                short_frame = short_frame or (bullet and last and n_chunk <= 25)
                if (terminated and 2 <= n_chunk <= 40) or short_frame or (terminated and n_chunk == 1 and i in tail):
                    ok_words += n_chunk
                chunk = []
    sentence_share = ok_words / n
    f_sent = ramp(sentence_share, 0.35, 0.75)
    if f_sent < 1:
        reasons.append(f"only {sentence_share:.0%} of words in sentences")

    # Word order: what English does not produce and a shuffled text is full of.
    errors = _order_errors(lines, words, proper)
    rate = len(errors) / max(n, 30)  # one slip in a 10-word text is not a shuffle
    f_order = ramp(rate, 0.055, 0.012)
    if f_order < 1:
        reasons.append(f"word order broken ({len(errors)} errors in {n} words: {', '.join(errors[:3])})")

    # Repetition and diversity.
    lows = [t.low for t in words]
    grams = list(zip(lows, lows[1:], lows[2:], lows[3:], strict=False))
    rep = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    distinct = len(set(lows)) / n
    f_rep = ramp(rep, 0.35, 0.05)
    if n >= 30:
        f_rep *= ramp(distinct, 0.15, 0.35)
    if f_rep < 1:
        reasons.append(f"repeated text ({rep:.0%} repeated 4-grams, {distinct:.0%} distinct words)")

    # Symbols and tokens that are not words.
    chars = sum(not ch.isspace() for ch in text) or 1
    sym = len(_SYMBOL_RE.findall(text)) / chars
    odd = sum(len(t.word) > 18 or (len(t.word) > 3 and not re.search(r"[aeiouyAEIOUY0-9]", t.word)) for t in words) / n
    f_sym = ramp(sym, 0.08, 0.02) * ramp(odd, 0.25, 0.05)
    if f_sym < 1:
        reasons.append(f"symbols/non-words ({sym:.0%} symbols, {odd:.0%} odd tokens)")

    if _LOREM_RE.search(text):
        reasons.append("lorem ipsum")
        return 0.0, reasons
    return f_stop * f_sent * f_order * f_rep * f_sym, reasons
