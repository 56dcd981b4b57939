"""The word lists of the offline rubric (`codreamer.rewards.rubric`): stopwords, stems too
generic to count as personalisation, words that need no fact behind them, call-to-action
signals and spam phrases. Data only.
"""

from __future__ import annotations

__all__ = [
    "ACRONYM_OK",
    "COMMON",
    "CTA_PHRASES",
    "CTA_WORDS",
    "GENERIC_STEMS",
    "SPAM_PHRASES",
    "STOPWORDS",
]

STOPWORDS = frozenset(
    """
    a about above across after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing done down during each
    few for from further had has have having he her here hers him his how i if in into is it its
    itself just me more most my no nor not now of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this those
    through to too under until up very was we were what when where which while who whom why will
    with would you your yours yourself via per new get got make made use used using within
    without lot lots many much every one two three really still well way etc
    """.split()
)

# Stems too generic to count as personalisation ("customers", "team", "open to a call").
GENERIC_STEMS = frozenset(
    """
    custom compan busine team time result growth grow produc servic soluti help improv work need
    open better day year month week people thing great good
    """.split()
)

# Capitalised words that are fine even if no fact mentions them (greetings, sign-offs,
# sentence starters, calendar words, common business acronyms).
COMMON = STOPWORDS | frozenset(
    """
    hi hello hey dear greetings thanks thank cheers best regards kind warm sincerely
    congrats congratulations noticed saw see seen read loved love enjoyed curious quick quickly
    wanted want reaching reach hope hoping happy glad great good excited given since
    let mind please looking forward team ps re fwd subject note question idea thoughts intro
    monday tuesday wednesday thursday friday saturday sunday today tomorrow week weekend month
    january february march april may june july august september october november december
    q1 q2 q3 q4 ceo cto cfo coo cio cmo cro vp svp evp sdr bdr ai ml api apis crm erp roi kpi kpis
    saas b2b b2c it hr ops devops seo usa us uk eu emea apac na ok okay
    i'm i've i'd i'll we're we've we'd we'll you're you've you'd you'll they're don't can't
    won't isn't aren't didn't doesn't haven't wouldn't couldn't
    """.split()
)
ACRONYM_OK = frozenset(w.upper() for w in COMMON if w.isalnum())

# Call-to-action signals: single words (matched on the word set) and phrases (matched on
# the space-joined word sequence).
CTA_WORDS = frozenset(
    "call calls chat meeting meet demo calendar schedule book connect zoom reply talk "
    "conversation interested minutes mins".split()
)
CTA_PHRASES = (
    "open to", "worth a", "catch up", "hop on", "would you", "are you", "could we", "can we",
    "shall we", "free to", "free for", "this week", "next week", "let me know",
    "walk you through", "show you",
)  # fmt: skip
SPAM_PHRASES = (
    "act now", "guaranteed", "guarantee", "100% free", "totally free", "absolutely free",
    "for free", "click here", "click below", "limited time", "risk-free", "buy now",
    "order now", "winner", "you have been selected", "no obligation", "no cost", "earn money",
    "make money", "extra cash", "double your", "once in a lifetime", "urgent", "exclusive deal",
    "special promotion", "best price", "cheap", "dear friend", "amazing offer", "don't miss",
    "do not miss", "miracle", "100% satisfied", "no strings attached", "call now", "apply now",
    "instant access", "million dollars",
)  # fmt: skip
