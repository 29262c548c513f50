"""Held-out data is held out for real (DESIGN §3 "Data integrity"), checked on the prompt strings of
the datasets the real configs build — not on a `subject` field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaedit.data.datamodule import FileEditData
from metaedit.data.integrity import assign_splits, subject_groups
from metaedit.models.loading import CONFIG_DIR
from metaedit.types import MetaEditError

SPLITS = ("train", "val", "test")


def _prompts(rec: dict) -> tuple[list[str], list[str], str]:
    """(edit + rephrase prompts, locality prompts, subject) of an internal-format record, written
    out here on purpose instead of reusing the code under test."""
    return [rec["prompt"], *rec["rephrases"]], [x["prompt"] for x in rec["locality"]], rec.get("subject", "")


def count_leaks(splits: dict[str, list[dict]]) -> dict[str, int]:
    train_prompts: set[str] = set()
    for r in splits["train"]:
        e, loc, _ = _prompts(r)
        train_prompts.update(e + loc)
    text = "\n".join(train_prompts)
    out = {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
    for split in ("val", "test"):
        subjects = set()
        for r in splits[split]:
            e, loc, subject = _prompts(r)
            out["edit_prompts"] += sum(p in train_prompts for p in e)
            out["loc_prompts"] += sum(p in train_prompts for p in loc)
            subjects.add(subject)
        # strict: a held-out subject as whole words inside any training prompt, no exceptions
        out["subjects"] += sum(bool(re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", text)) for s in subjects if s)
    return out


def build(data: str, tmp_path: Path, *overrides: str) -> dict[str, list[dict]]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", "model=tiny-gpt2", f"paths.root_dir={tmp_path}", *overrides])
    dm = instantiate(cfg.data, formatter=None, _recursive_=False)
    return {s: dm.records(s) for s in SPLITS}


@pytest.mark.parametrize("data", ["worldfacts", "synthetic", "worldfacts_wide"])
def test_default_builds_are_leak_free(tmp_path, data):
    splits = build(data, tmp_path)
    assert all(splits[s] for s in SPLITS)
    if data == "worldfacts_wide":  # the wide world: other issues measure 1000 held-out edits
        assert len({r["relation"] for r in splits["test"]}) >= 15 and len(splits["test"]) >= 1000
    assert count_leaks(splits) == {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
    # locality inputs still exist on every record, from the record's own split
    assert all(r["locality"] for s in SPLITS for r in splits[s])
    # the built directory is versioned and carries a manifest of what built it
    built = [p for p in (tmp_path / "data").iterdir() if p.is_dir()]
    assert len(built) == 1 and "-v" in built[0].name and (built[0] / "manifest.json").is_file()
    # data=worldfacts and synthetic stay data version 2 (the published numbers); the wide world is 3
    assert built[0].name.endswith("-v3" if data == "worldfacts_wide" else "-v2")


def cross_leaks(train: list[dict], held: list[dict]) -> dict[str, int]:
    """`count_leaks` across two datasets: `held` (another dataset's val/test) against `train`."""
    return count_leaks({"train": train, "val": held, "test": []})


def test_keep_out_holds_another_datasets_test_out_of_training(tmp_path):
    """Train on the wide world, score on data=worldfacts's test: the wide split alone would train on
    some of that test's prompts and subjects; `data.keep_out` drops them from train and val."""
    narrow = build("worldfacts", tmp_path)
    held = narrow["val"] + narrow["test"]
    plain = build("worldfacts_wide", tmp_path)
    assert sum(cross_leaks(plain["train"], held).values()) > 0  # what keep_out is for
    kept = build("worldfacts_wide", tmp_path, f"data.keep_out=[{tmp_path}/data/worldfacts-v2]")
    for split in ("train", "val"):
        assert cross_leaks(kept[split], held) == {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
        assert 0 < len(kept[split]) < len(plain[split])
    assert kept["test"] == plain["test"]  # the wide test split is untouched
    built = tmp_path / "data" / "worldfacts_wide-v3-keepout-worldfacts-v2"
    assert list(json.loads((built / "manifest.json").read_text())["keep_out"]) == [f"{tmp_path}/data/worldfacts-v2"]
    with pytest.raises(MetaEditError, match="keep_out.*not found"):
        build("worldfacts_wide", tmp_path, f"data.keep_out=[{tmp_path}/nowhere]")


def test_heldout_relation_goes_to_test_only(tmp_path):
    splits = build("worldfacts", tmp_path, "data.heldout_relations=[capital]")
    assert not [r for s in ("train", "val") for r in splits[s] if r["relation"] == "capital"]
    assert len([r for r in splits["test"] if r["relation"] == "capital"]) >= 30
    assert count_leaks(splits) == {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
    assert any(p.name.endswith("-heldout-capital") for p in (tmp_path / "data").iterdir())


def test_subjects_that_contain_one_another_share_a_split():
    groups = subject_groups(["Guatemala", "Guatemala City", "Papua New Guinea", "Guinea", "Nigeria", "Niger"])
    assert groups["Guatemala City"] == groups["Guatemala"] == "Guatemala"
    assert groups["Papua New Guinea"] == groups["Guinea"]
    assert groups["Nigeria"] != groups["Niger"]  # not a whole-word match
    items = [(s, "r", s) for s in ["Guatemala", "Guatemala City", "Mexico", "Mexico City"] * 3]
    split_of, _ = assign_splits(items, seed=0, val_frac=0.3, test_frac=0.3)
    by_subject = {}
    for (s, _, _), sp in zip(items, split_of):
        by_subject.setdefault(s, set()).add(sp)
    assert by_subject["Guatemala"] == by_subject["Guatemala City"] and len(by_subject["Guatemala"]) == 1


ZSRE = {"src": "", "pred": "x", "rephrase": "", "alt": "", "answers": ["y"], "loc": "", "loc_ans": "z", "cond": ""}


def test_one_file_is_split_by_subject_without_leaks(tmp_path, caplog):
    people = [f"Person {chr(65 + i)}{chr(65 + j)}" for i in range(6) for j in range(6)]
    records = []
    for k, who in enumerate(people):
        for q in range(3):  # repeated subjects: three questions about each person
            records.append({**ZSRE, "subject": who, "src": f"Question {q} about {who}?", "alt": f"Alt {k}.{q}",
                            "rephrase": f"Rephrased question {q} about {who}?", "loc": f"nq question: unrelated {k} {q}",
                            "case_id": f"{who}:{q}"})
    # Records that name another person in their prompt, and share a locality question with
    # others: wherever the split puts them, nothing held out may reach training.
    for k, (who, other) in enumerate(zip(people, people[1:])):
        records.append({**ZSRE, "subject": who, "src": f"Is {who} older than {other}?", "alt": "yes",
                        "rephrase": f"{who} vs {other}?", "loc": f"nq question: unrelated {k + 1} 0", "case_id": f"cmp{k}"})
    (tmp_path / "mine.json").write_text(json.dumps(records))

    def read() -> dict[str, list[dict]]:
        data = FileEditData(path=str(tmp_path / "mine.json"), format="zsre", name="zsre", data_dir=str(tmp_path / "d"),
                            formatter=None, val_frac=0.2, test_frac=0.2)
        return {s: data.records(s) for s in SPLITS}

    with caplog.at_level("WARNING"):
        a = read()
    assert a == read() and all(a[s] for s in SPLITS)
    subjects = {s: {r["subject"] for r in a[s]} for s in SPLITS}
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["val"]
    assert not subjects["val"] & subjects["test"]
    assert count_leaks(a) == {"edit_prompts": 0, "loc_prompts": 0, "subjects": 0}
    kept = sum(len(v) for v in a.values())
    assert 0 < len(records) - kept < 20  # the comparisons naming a held-out person, and only those
    assert f"dropped {len(records) - kept} of" in caplog.text


def test_eval_relations_scores_exactly_the_held_out_relations(tmp_path):
    """An editor trained with heldout_relations is scored on exactly those (evaluate.py
    data.eval_relations=[...]); training records stay as they are; a relation a split lacks is refused."""
    held = "data.heldout_relations=[capital,currency]"

    def data(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["data=worldfacts", "model=tiny-gpt2", f"paths.root_dir={tmp_path}", *overrides])
        return instantiate(cfg.data, formatter=None, _recursive_=False)

    plain, picked = data(held), data(held, "data.eval_relations=[capital,currency]")
    assert picked.records("train") == plain.records("train")
    assert picked.records("test") == [r for r in plain.records("test") if r["relation"] in ("capital", "currency")]
    assert {r["relation"] for r in picked.records("test")} == {"capital", "currency"}
    with pytest.raises(MetaEditError, match=r"val has no record of relation\(s\) \['capital', 'currency'\]"):
        picked.records("val")  # held out: no val record of it
    with pytest.raises(MetaEditError, match="no record of relation"):
        data("data.eval_relations=[capitol]").records("test")
