"""Write the synthetic outreach data set: `prospects.jsonl`, `splits.json` and `product.json`.

Every prospect, company and news item is invented. The data are tables (industries, titles,
pain points, news templates, names) combined by one seeded `random.Random`, so the same seed
always gives byte-identical files and the checked-in data can be regenerated and diffed.

Run: `uv run python scripts/make_prospects.py [--out-dir data] [--seed 7]`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from codreamer.domain import Company, Persona, Product, Prospect

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_SEED = 7
PER_INDUSTRY = 4  # 12 industries x 4 = 48 prospects
HELDOUT_PER_INDUSTRY = 1  # 12 held out, 36 train, every industry on both sides

PERSONAS: tuple[Persona, ...] = ("analytical", "busy_executive", "technical", "skeptical", "relationship")

PRODUCT = Product(
    name="Pipewise",
    one_liner=(
        "Pipewise captures every email, call and meeting into your CRM automatically and flags "
        "deals at risk before the forecast call."
    ),
    value_props=[
        "Reps stop updating the CRM by hand: activity is logged from email, calendar and calls",
        "A weekly forecast built from real deal activity, not rep-submitted spreadsheets",
        "Early warnings on stalled deals, single-threaded accounts and slipping close dates",
        "Two-way sync with Salesforce and HubSpot, set up in a day without custom scripts",
    ],
    call_to_action="a 15-minute call next week",
    sender_name="Maya Lindqvist",
    sender_title="Account Executive, Pipewise",
)


@dataclass(frozen=True)
class Industry:
    """One industry: how its companies are named, how big they are, what they run and face."""

    name: str
    name_stems: tuple[str, ...]  # invented words; each company gets a unique stem + suffix
    name_suffixes: tuple[str, ...]
    tld: str
    employees: tuple[int, int]
    tools: tuple[str, ...]
    pains: tuple[str, ...]  # selling problems typical of the industry
    news: tuple[str, ...]  # templates: {city} {month} {n} {money} {series}


INDUSTRIES: tuple[Industry, ...] = (
    Industry(
        "logistics",
        ("Quayline", "Brackenford", "Ostlane", "Carrowmoor", "Merrowgate", "Hallowdyke"),
        (" Freight", " Logistics", " Haulage"),
        "com",
        (180, 2400),
        ("SAP TM", "Samsara", "Descartes", "Power BI"),
        (
            "large shipper RFPs run for months with a dozen stakeholders and no shared view of where they stand",
            "volatile spot rates make every quote and every forecast out of date within weeks",
            "peak-season contracts are negotiated in a rush with little visibility into the pipeline",
        ),
        (
            "opened a second distribution centre in {city} in {month}",
            "signed a five-year contract with a national grocery chain in {month}",
            "added {n} electric HGVs to its fleet in {month}",
        ),
    ),
    Industry(
        "fintech",
        ("Ledgerfold", "Coinvale", "Paxbridge", "Tallystone", "Finwick", "Quillmark"),
        ("", " Payments", " Finance"),
        "io",
        (60, 900),
        ("Stripe", "Snowflake", "Plaid", "Looker"),
        (
            "compliance review adds three to six weeks to every enterprise deal",
            "bank procurement cycles stretch past nine months, so close dates keep slipping",
            "the partnership pipeline with banks is tracked in a spreadsheet nobody owns",
        ),
        (
            "raised a {money} Series {series} in {month} to expand into mid-market lending",
            "received its e-money licence in {month} and launched business accounts",
            "announced a partnership with a regional bank network in {month}",
        ),
    ),
    Industry(
        "healthcare SaaS",
        ("Caremint", "Wardleaf", "Medivance", "Clinora", "Pulsefield", "Vitabridge"),
        (" Health", "", " Clinical"),
        "com",
        (80, 1200),
        ("Epic integrations", "AWS", "Zendesk", "Tableau"),
        (
            "hospital buying committees of ten or more people slow down every deal",
            "security and HIPAA questionnaires stall deals in the last stage",
            "renewals depend on clinical champions who change roles often",
        ),
        (
            "went live in {n} new hospital systems in {month}",
            "passed its SOC 2 Type II audit in {month}",
            "launched a remote patient monitoring module in {month}",
        ),
    ),
    Industry(
        "e-commerce",
        ("Basketry", "Cartwheel", "Loomhaus", "Parcelbird", "Shelfwise", "Threadnest"),
        (" Commerce", " Goods", " Co"),
        "com",
        (40, 650),
        ("Shopify Plus", "Klaviyo", "Google Analytics 4", "NetSuite"),
        (
            "wholesale and marketplace partner deals are tracked outside the CRM",
            "seasonal demand makes Q4 pipeline planning a guessing game",
            "retail buyer meetings happen at trade shows and the notes never reach the CRM",
        ),
        (
            "launched in {n} new European markets in {month}",
            "opened a flagship store in {city} in {month}",
            "signed a wholesale deal with a national department store chain in {month}",
        ),
    ),
    Industry(
        "manufacturing",
        ("Forgewell", "Ironmere", "Castwright", "Kelbrook", "Anvilton", "Tarnstead"),
        (" Industries", " Precision", " Components"),
        "com",
        (250, 3800),
        ("SAP S/4HANA", "Epicor", "Siemens Teamcenter", "Excel"),
        (
            "distributor channel sales are invisible until the orders land",
            "quote-to-order cycles on custom parts take eight to twelve weeks",
            "the ERP and the CRM disagree on which accounts are still active",
        ),
        (
            "opened a new machining plant in {city} in {month}",
            "won a multi-year supply contract with an aerospace tier-one in {month}",
            "acquired a smaller competitor in {city} in {month}",
        ),
    ),
    Industry(
        "cybersecurity",
        ("Sentrava", "Lockhaven", "Ciphermoor", "Bastionix", "Wardwire", "Vaultreach"),
        (" Security", "", " Labs"),
        "io",
        (50, 800),
        ("AWS", "Okta", "Splunk", "Jira"),
        (
            "proof-of-concept evaluations drag on without clear exit criteria",
            "every deal has three competitors and the win rate is hard to read",
            "CISO buyers ignore generic outreach, so pipeline generation depends on a few referrals",
        ),
        (
            "raised a {money} Series {series} in {month}",
            "was named in an analyst report on cloud detection and response in {month}",
            "opened a security operations centre in {city} in {month}",
        ),
    ),
    Industry(
        "edtech",
        ("Brightquill", "Slatehouse", "Quizmoor", "Chalkpath", "Tutorbay", "Inkspring"),
        (" Learning", " Education", ""),
        "com",
        (30, 500),
        ("Google Workspace", "Canvas LTI", "Intercom", "Metabase"),
        (
            "district and university budgets lock in during a short spring window",
            "procurement runs through public tenders with strict deadlines",
            "usage data from pilots never reaches the sales team before renewal talks",
        ),
        (
            "signed its largest school district contract to date in {month}",
            "launched an AI tutoring feature for secondary schools in {month}",
            "expanded into the {city} university market in {month}",
        ),
    ),
    Industry(
        "real estate",
        ("Keystead", "Brickmoor", "Lintelworth", "Gablegate", "Doorfield", "Plinthway"),
        (" Property", " Estates", " Realty"),
        "com",
        (40, 700),
        ("Yardi", "Microsoft 365", "DocuSign", "CoStar"),
        (
            "broker and landlord relationships live in personal inboxes",
            "deal timelines depend on financing outside the team's control",
            "the leasing pipeline is reported from a spreadsheet updated once a month",
        ),
        (
            "completed the purchase of a {n}0-unit build-to-rent scheme in {city} in {month}",
            "opened a new office in {city} in {month}",
            "launched a flexible workspace brand in {month}",
        ),
    ),
    Industry(
        "insurance",
        ("Covermill", "Shieldcroft", "Prudholm", "Harbourwell", "Assurewick", "Policyne"),
        (" Insurance", " Underwriting", " Mutual"),
        "com",
        (120, 2200),
        ("Guidewire", "Duck Creek", "Snowflake", "Outlook"),
        (
            "broker channel pipeline is reported monthly, weeks after the numbers matter",
            "renewal season floods the team with manual follow-ups",
            "the legacy policy admin system cannot feed opportunity data to the CRM",
        ),
        (
            "launched a cyber insurance product for small businesses in {month}",
            "appointed {n} new broker partners in {month}",
            "opened a claims centre in {city} in {month}",
        ),
    ),
    Industry(
        "hospitality",
        ("Lanternby", "Stayhaven", "Innsmere", "Roamwell", "Courtyarde", "Hearthley"),
        (" Hotels", " Hospitality", " Group"),
        "com",
        (300, 4000),
        ("Oracle Opera", "Cvent", "Mailchimp", "Power BI"),
        (
            "group and corporate bookings are tracked in a spreadsheet per property",
            "sales managers at different properties chase the same corporate accounts",
            "event leads from the website wait days for a first reply",
        ),
        (
            "opened a {n}0-room hotel in {city} in {month}",
            "completed a refurbishment of its conference centre in {city} in {month}",
            "launched a corporate travel programme in {month}",
        ),
    ),
    Industry(
        "renewable energy",
        ("Solwick", "Windmere", "Greenlayne", "Voltmere", "Brightacre", "Sunhollow"),
        (" Energy", " Renewables", " Power"),
        "com",
        (90, 1500),
        ("Aurora Solar", "PVsyst", "SharePoint", "Power BI"),
        (
            "commercial solar projects take 12 to 18 months from first meeting to contract",
            "permitting delays make close dates unreliable",
            "project developers and sales track the same sites in different systems",
        ),
        (
            "connected a {n}0 MW solar farm near {city} to the grid in {month}",
            "secured {money} of project finance in {month}",
            "signed a power purchase agreement with a supermarket chain in {month}",
        ),
    ),
    Industry(
        "HR tech",
        ("Rostermill", "Peoplewell", "Hirewick", "Staffora", "Teamquarry", "Payhollow"),
        (" HR", "", " Software"),
        "io",
        (40, 600),
        ("Workday integrations", "Slack", "Intercom", "Mixpanel"),
        (
            "mid-market deals stall when the HR buyer needs finance sign-off",
            "SMB churn hides inside healthy-looking aggregate numbers",
            "the product-led free tier produces thousands of sign-ups and nobody knows which to call",
        ),
        (
            "crossed {n},000 customers in {month}",
            "raised a {money} Series {series} in {month}",
            "launched payroll in {n} new countries in {month}",
        ),
    ),
)


@dataclass(frozen=True)
class Title:
    """A job title, its seniority, the kind of work it does and the personas that fit it."""

    title: str
    seniority: str
    role: str  # key into ROLE_PAINS
    personas: tuple[Persona, ...]


TITLES: tuple[Title, ...] = (
    Title("Chief Revenue Officer", "c_level", "exec", ("busy_executive", "skeptical", "relationship", "analytical")),
    Title("Chief Executive Officer", "c_level", "exec", ("busy_executive", "relationship", "skeptical")),
    Title("Chief Operating Officer", "c_level", "exec", ("busy_executive", "analytical")),
    Title("Chief Technology Officer", "c_level", "systems", ("technical", "skeptical", "busy_executive")),
    Title("VP of Sales", "vp", "sales_leader", ("busy_executive", "relationship", "skeptical", "analytical")),
    Title("VP of Revenue Operations", "vp", "revops", ("analytical", "skeptical", "busy_executive")),
    Title("VP of Business Development", "vp", "sales_leader", ("relationship", "busy_executive")),
    Title("Head of Sales", "director", "sales_leader", ("relationship", "busy_executive", "skeptical")),
    Title("Director of Sales Operations", "director", "revops", ("analytical", "technical", "skeptical")),
    Title("Director of Business Systems", "director", "systems", ("technical", "skeptical", "analytical")),
    Title("Regional Sales Manager", "manager", "frontline", ("relationship", "skeptical", "analytical")),
    Title("SDR Team Lead", "manager", "sdr", ("relationship", "analytical")),
    Title("Revenue Operations Manager", "manager", "revops", ("analytical", "technical")),
    Title("Sales Enablement Manager", "manager", "enablement", ("relationship", "analytical", "skeptical")),
    Title("Salesforce Administrator", "individual_contributor", "systems", ("technical", "skeptical")),
    Title("Senior CRM Engineer", "individual_contributor", "systems", ("technical", "analytical")),
    Title("Senior Account Executive", "individual_contributor", "frontline", ("relationship", "skeptical")),
)

ROLE_PAINS: dict[str, tuple[str, ...]] = {
    "exec": (
        "the board wants a forecast it can trust and the number moved 20% in the last two weeks of the quarter",
        "no single view of pipeline health across regions without asking three people",
        "new-logo growth slowed while sales headcount grew",
    ),
    "sales_leader": (
        "Monday forecast calls take two hours of reconciling rep spreadsheets with the CRM",
        "deals slip at the last minute with no early warning",
        "new reps take five months to ramp to quota",
    ),
    "revops": (
        "half the open opportunities have no activity logged in the last 30 days",
        "the weekly pipeline report is built by hand from three CRM exports",
        "every team applies the stage definitions differently",
    ),
    "systems": (
        "brittle custom sync scripts between the CRM and the email platform break every few weeks",
        "every new sales tool request becomes another integration to secure and maintain",
        "thousands of duplicate contact and account records left over from the last CRM migration",
    ),
    "frontline": (
        "Friday afternoons go on updating opportunities instead of selling",
        "deals with six or more stakeholders are hard to keep track of",
        "no time to research accounts before calls",
    ),
    "sdr": (
        "reply rates on outbound sequences dropped below 2%",
        "context from first calls is lost in the SDR-to-AE handoff",
        "the team cannot tell which inbound leads to call first",
    ),
    "enablement": (
        "no way to see which talk tracks actually move deals forward",
        "coaching is based on the few calls managers have time to listen to",
        "onboarding material is out of date the moment it ships",
    ),
}

CRMS = ("Salesforce", "HubSpot", "Pipedrive", "Microsoft Dynamics 365")
SALES_TOOLS = ("Outreach", "Salesloft", "Gong", "ZoomInfo", "Apollo", "LinkedIn Sales Navigator", "Slack", "Zoom")

# (city, country, currency symbol) -- headquarters and the places news happens
CITIES: tuple[tuple[str, str, str], ...] = (
    ("Leeds", "UK", "£"),
    ("Manchester", "UK", "£"),
    ("Bristol", "UK", "£"),
    ("Glasgow", "UK", "£"),
    ("Dublin", "Ireland", "€"),
    ("Rotterdam", "Netherlands", "€"),
    ("Berlin", "Germany", "€"),
    ("Lyon", "France", "€"),
    ("Austin", "TX", "$"),
    ("Denver", "CO", "$"),
    ("Chicago", "IL", "$"),
    ("Atlanta", "GA", "$"),
    ("Boston", "MA", "$"),
    ("Toronto", "Canada", "$"),
)

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September")

FIRST_NAMES = (
    "Aisha", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hamza", "Ingrid", "James",
    "Keiko", "Liam", "Maria", "Nikhil", "Olivia", "Pedro", "Rachel", "Samuel", "Tanya", "Umar",
    "Vanessa", "Wei", "Yusuf", "Zara", "Amelia", "Connor", "Priya", "Tomasz", "Helen", "Kwame",
)  # fmt: skip
LAST_NAMES = (
    "Ahmed", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Gupta", "Hughes", "Ivanova",
    "Jensen", "Kowalski", "Lindgren", "Mensah", "Nakamura", "Okafor", "Patel", "Quinn", "Rossi",
    "Schneider", "Thompson", "Walsh", "Yilmaz", "Zhang", "Morgan", "Carter", "Novak", "Reyes",
)  # fmt: skip


def company_domain(name: str, tld: str) -> str:
    """The company's web domain: its name lowercased with everything but letters dropped."""
    return re.sub(r"[^a-z]", "", name.lower()) + "." + tld


def make_news(industry: Industry, currency: str, rng: random.Random) -> str:
    """Fill one of the industry's news templates with a city, a month and plausible numbers."""
    return rng.choice(industry.news).format(
        city=rng.choice(CITIES)[0],
        month=rng.choice(MONTHS),
        n=rng.randint(3, 12),
        money=f"{currency}{rng.choice((8, 12, 18, 25, 40, 60))}m",
        series=rng.choice("ABC"),
    )


def make_company(industry: Industry, name: str, crm: str, rng: random.Random) -> Company:
    """A company of the industry, with an HQ, a size, a tool stack and a news trigger."""
    city, country, currency = rng.choice(CITIES)
    low, high = industry.employees
    tools = [crm, *rng.sample(SALES_TOOLS, 2), *rng.sample(industry.tools, 2)]
    return Company(
        name=name,
        industry=industry.name,
        employees=round(rng.randint(low, high), -1),
        headquarters=f"{city}, {country}",
        recent_news=make_news(industry, currency, rng),
        tech_stack=tools,
    )


def company_names(industry: Industry, rng: random.Random) -> list[str]:
    """PER_INDUSTRY distinct invented names: distinct stems, each with a random suffix."""
    return [stem + rng.choice(industry.name_suffixes) for stem in rng.sample(industry.name_stems, PER_INDUSTRY)]


def make_prospects(rng: random.Random) -> list[Prospect]:
    """48 prospects: 4 per industry, personas cycled so each appears 9-10 times, ids shuffled."""
    slots = [(industry, name) for industry in INDUSTRIES for name in company_names(industry, rng)]
    rng.shuffle(slots)
    people = rng.sample([(first, last) for first in FIRST_NAMES for last in LAST_NAMES], len(slots))
    prospects = []
    for index, ((industry, company_name), (first, last)) in enumerate(zip(slots, people, strict=True)):
        persona = PERSONAS[index % len(PERSONAS)]
        title = rng.choice([t for t in TITLES if persona in t.personas])
        pains = rng.sample(ROLE_PAINS[title.role], rng.choice((1, 2))) + [rng.choice(industry.pains)]
        crm = "Salesforce" if "Salesforce" in title.title else rng.choice(CRMS)
        prospects.append(
            Prospect(
                prospect_id=f"p{index + 1:03d}",
                first_name=first,
                last_name=last,
                email=f"{first.lower()}.{last.lower()}@{company_domain(company_name, industry.tld)}",
                title=title.title,
                seniority=title.seniority,
                persona=persona,
                pain_points=pains,
                company=make_company(industry, company_name, crm, rng),
            )
        )
    return prospects


def make_splits(prospects: list[Prospect], rng: random.Random) -> dict[str, list[str]]:
    """Hold out one prospect per industry, each time from the persona least held out so far.

    That stratifies by industry exactly and by persona as evenly as 12 picks over 5 personas allow.
    """
    held_per_persona = dict.fromkeys(PERSONAS, 0)
    heldout: set[str] = set()
    for industry in INDUSTRIES:
        candidates = [p for p in prospects if p.company.industry == industry.name]
        rng.shuffle(candidates)
        for pick in sorted(candidates, key=lambda p: held_per_persona[p.persona])[:HELDOUT_PER_INDUSTRY]:
            heldout.add(pick.prospect_id)
            held_per_persona[pick.persona] += 1
    ids = [p.prospect_id for p in prospects]
    return {"train": [i for i in ids if i not in heldout], "heldout": [i for i in ids if i in heldout]}


def check(prospects: list[Prospect], splits: dict[str, list[str]]) -> None:
    """Fail loudly if a table edit broke an invariant the training loop and tests rely on."""
    names = [p.company.name for p in prospects]
    assert len(set(names)) == len(names), "company names must be unique"
    assert len({p.email for p in prospects}) == len(prospects), "emails must be unique"
    by_id = {p.prospect_id: p for p in prospects}
    for split, ids in splits.items():
        assert {by_id[i].persona for i in ids} == set(PERSONAS), f"{split} lacks a persona"
        assert len({by_id[i].company.industry for i in ids}) == len(INDUSTRIES), f"{split} lacks an industry"


def main(out_dir: Path = DEFAULT_OUT_DIR, seed: int = DEFAULT_SEED) -> list[Path]:
    """Generate the data set with `seed` into `out_dir`; return the files written."""
    rng = random.Random(seed)
    prospects = make_prospects(rng)
    splits = make_splits(prospects, rng)
    check(prospects, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "prospects.jsonl": "".join(p.model_dump_json() + "\n" for p in prospects),
        "splits.json": json.dumps(splits, indent=2) + "\n",
        "product.json": json.dumps(PRODUCT.model_dump(), indent=2, ensure_ascii=False) + "\n",
    }
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="folder to write (default: data/)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    for path in main(args.out_dir, args.seed):
        print(f"wrote {path}")
