"""Text primitives shared by the ``email_form`` gate's checks: tokens, logical lines, ramps.

A token keeps its raw form (punctuation included), its alphanumeric core and the lowercased
core; lines hard-wrapped inside a sentence are joined back before anything counts them.
Everything here is pure and total.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "FUNCTION_WORDS",
    "ORG_SUFFIXES",
    "SENTENCE_END_RE",
    "WORD_CHARS_RE",
    "Token",
    "logical_lines",
    "ramp",
    "tokens",
    "trigrams",
]

# Closed-class English words: the glue of real sentences. Word salad has almost none.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those my your our their his her its i me we us you he him she they
    them it of in on at by for with from to into onto about over under after before between
    through during without within than as and or but nor so if when while because although
    is are was were be been being am do does did have has had will would can could should shall
    may might must not no there here what which who whom whose why how all any each every some
    such only just also very too then now up out more most other another same own both either
    """.split()
)
ORG_SUFFIXES = frozenset(
    """
    labs lab inc corp corporation co ltd llc gmbh group systems security health insurance freight
    logistics bank capital partners technologies technology solutions software analytics
    networks holdings industries foods motors energy robotics ai
    """.split()
)

_LINE_TOKEN_RE = re.compile(r"\S+")
_CORE_RE = re.compile(r"^[\"'“‘(\[*_<>-]*(.*?)[\"'”’)\].,!?;:…*_<>-]*$")
WORD_CHARS_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_TOKEN_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:[-'’][A-Za-z0-9]+)*")
SENTENCE_END_RE = re.compile(r"[.!?…][\"'”’)\]]*$")


@dataclass(frozen=True)
class Token:
    raw: str
    word: str  # the alphanumeric core, original case ("" for pure punctuation)
    low: str


def tokens(line: str) -> list[Token]:
    out = []
    for raw in _LINE_TOKEN_RE.findall(line):
        m = _CORE_RE.match(raw)
        core = m.group(1) if m else raw
        w = _TOKEN_WORD_RE.search(core)
        word = core if w and w.group(0) == core else (w.group(0) if w else "")
        out.append(Token(raw, word, word.lower().replace("’", "'")))
    return out


def logical_lines(text: str) -> list[str]:
    """Lines, with hard-wrapped prose joined back: a line of 6+ words that does not end a
    sentence continues on the next line, unless that one is empty or a bullet."""
    out: list[str] = []
    for line in text.splitlines():
        prev = out[-1] if out else ""
        if (
            line.strip()
            and len(prev.split()) >= 6
            and not SENTENCE_END_RE.search(prev.rstrip())
            and line.lstrip()[:1] not in "-*•"
        ):
            out[-1] = prev.rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out


def ramp(x: float, zero: float, one: float) -> float:
    """0 at `zero`, 1 at `one`, linear between (works for either direction)."""
    t = (x - zero) / (one - zero)
    return min(1.0, max(0.0, t))


def trigrams(words: list[str]) -> set[tuple[str, str, str]]:
    return set(zip(words, words[1:], words[2:], strict=False))
