"""Evaluation protocols (DESIGN §3): single / batch N / sequential N batch B, scored in bounded chunks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from metaedit.bench import _same_eval, markdown_table, protocol_tag
from metaedit.data.datamodule import EditCollator
from metaedit.data.synthetic import build_world
from metaedit.editors.io import save_editor
from metaedit.evaluation import evaluate_editor, protocol_from
from metaedit.metrics import evaluate_edit_batch, row_ranges
from metaedit.protocols import Protocol
from metaedit.types import MetaEditError

WORLD = build_world(seed=0, n_subjects=200)
SUBJECT = next(s for s in WORLD.subjects if WORLD.split_of[s] == "test")


def _record(prompt: str, target: str) -> dict:
    other = next(s for s in WORLD.subjects if s != SUBJECT)
    return {"prompt": prompt, "target_new": target, "rephrases": [prompt],
            "locality": [{"prompt": f"The capital of {other} is", "answer": WORLD.facts[(other, "capital")]}]}


def test_sequential_protocol_counts_an_overwritten_edit_as_a_failure(make_editor):
    ed = make_editor("ft", "tiny-gpt2")
    ed.eval()
    prompt = f"The capital of {SUBJECT} is"
    first, second = [o for o in WORLD.objects["capital"] if o != WORLD.facts[(SUBJECT, "capital")]][:2]
    batch = EditCollator(ed.formatter, sample=False)([_record(prompt, first), _record(prompt, second)])
    # Each edit alone succeeds (FT runs until the edit is exactly right) ...
    for i in range(2):
        alone = EditCollator(ed.formatter, sample=False)([_record(prompt, (first, second)[i])])
        assert evaluate_edit_batch(ed, alone)["edit_exact"].tolist() == [1.0]
    # ... but after the second edit of the same prompt, the first one is gone: measured after the last.
    out = evaluate_edit_batch(ed, batch, protocol=Protocol("sequential", n=2, batch=1))
    assert out["edit_exact"].tolist() == [0.0, 1.0]
    assert out["rephrase_exact"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("method", ["ft", "mend"])
def test_batch_protocol_scores_every_edit_of_the_group(make_editor, make_data, method, tmp_path):
    ed = make_editor(method, "tiny-gpt2", **({"steps": 3} if method == "ft" else {}))
    data = make_data(ed.formatter)
    report = evaluate_editor(ed, data, limit=6, protocol=Protocol("batch", n=3))
    assert report["metrics"]["n_edits"] == 6
    assert (report["protocol"], report["n"], report["batch"], report["edits_per_batch"]) == ("batch", 3, 1, 3)
    # Per relation too: every row of a group goes to its own edit's relation, so the relations' figures
    # add up to the whole (weighted by their edits) and each edit counts once.
    relations = [r["relation"] for r in data.records("test")[:6]]
    per = report["by_relation"]
    assert set(per) == set(relations) and len(per) > 1
    assert {rel: r["n_edits"] for rel, r in per.items()} == {rel: relations.count(rel) for rel in per}
    for key in ("edit_acc", "es"):
        pooled = sum(r[key] * r["n_edits"] for r in per.values()) / 6
        assert pooled == pytest.approx(report["metrics"][key], abs=1e-6), key
    seq = evaluate_editor(ed, data, limit=6, protocol=Protocol("sequential", n=6, batch=2),
                          save_sequences=tmp_path / "run.sequence")
    assert seq["metrics"]["n_edits"] == 6 and (seq["protocol"], seq["n"], seq["batch"]) == ("sequential", 6, 2)
    assert not list(tmp_path.iterdir())  # the part-way save of the sequence is gone once it is scored


def test_per_edit_lines_name_each_edit_and_add_up_to_the_report(make_editor, make_data, tmp_path):
    import json

    ed = make_editor("ft", "tiny-gpt2", steps=3)
    data = make_data(ed.formatter)
    report = evaluate_editor(ed, data, limit=6, protocol=Protocol("batch", n=3), per_edit=tmp_path / "edits.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "edits.jsonl").read_text().splitlines()]
    records = data.records("test")[:6]
    assert [x["index"] for x in lines] == list(range(6)) and [x["group"] for x in lines] == [0, 0, 0, 1, 1, 1]
    assert [(x["prompt"], x["target_new"], x["relation"]) for x in lines] == [
        (r["prompt"], r["target_new"], r["relation"]) for r in records]
    # Every edit's own figures, each over its own rows: their mean over edits is the report's.
    for key in ("edit_acc", "es"):
        row_key = "edit_exact" if key == "edit_acc" else key
        assert sum(x[row_key] for x in lines) / 6 == pytest.approx(report["metrics"][key], abs=1e-6), key
    assert all(0 <= x["ps"] <= 1 and 0 <= x["ns"] <= 1 for x in lines)
    assert report["per_edit"] == str(tmp_path / "edits.jsonl")


def test_per_edit_figures_leave_out_rows_that_belong_to_no_one_edit(make_editor, make_data):
    import dataclasses

    from metaedit.evaluation import outcome_by_edit, outcome_by_relation

    ed = make_editor("ft", "tiny-gpt2", steps=3)
    batch = next(iter(make_data(ed.formatter).loader("test", limit=2, shuffle=False, batch_size=2)))
    outcome = evaluate_edit_batch(ed, batch, protocol=Protocol("batch", n=2))
    owned = outcome_by_edit(outcome, batch)
    assert all("ns" in x and "es" in x and "ps" in x for x in owned)
    # Without owners for the out-of-scope rows, each edit keeps its own es / ps and no ns is made up.
    unowned = dataclasses.replace(batch, loc_owner=None)
    lines = outcome_by_edit(outcome, unowned)
    assert [x["es"] for x in lines] == [x["es"] for x in owned] and all("ns" not in x for x in lines)
    assert outcome_by_relation(outcome, unowned, ["a", "b"]) == {}


def test_chunked_scoring_equals_one_stacked_forward(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    ed.eval()
    batch = next(iter(make_data(ed.formatter).loader("test", limit=4, shuffle=False, batch_size=4)))
    whole = evaluate_edit_batch(ed, batch, max_rows=1024)
    chunked = evaluate_edit_batch(ed, batch, max_rows=3)
    assert whole.keys() == chunked.keys()
    for k in whole:
        if k != "edit_ms":
            torch.testing.assert_close(whole[k], chunked[k], atol=1e-5, rtol=1e-5, msg=k)


def test_row_ranges_bound_every_forward():
    groups = row_ranges([5, 0, 7], max_rows=4)
    assert all(sum(b - a for _, a, b in g) <= 4 for g in groups)
    covered = {(i, r) for g in groups for i, a, b in g for r in range(a, b)}
    assert covered == {(0, r) for r in range(5)} | {(2, r) for r in range(7)}


def test_protocol_options_and_the_older_n_edits_knob():
    assert protocol_from(OmegaConf.create({})) == Protocol("single")
    assert protocol_from(OmegaConf.create({"protocol": "batch", "n": 10, "batch": 4})) == Protocol("batch", 10)
    assert protocol_from(OmegaConf.create({"n_edits": 5})) == Protocol("batch", 5)
    assert protocol_from(OmegaConf.create({"protocol": "sequential", "n": 8, "batch": 2})) == Protocol("sequential", 8, 2)
    with pytest.raises(MetaEditError, match="n_edits"):
        protocol_from(OmegaConf.create({"protocol": "sequential", "n": 8, "n_edits": 5}))
    with pytest.raises(MetaEditError, match="batch=9"):
        Protocol("sequential", n=8, batch=9)
    with pytest.raises(MetaEditError, match="unknown protocol"):
        Protocol("parallel")


def test_bench_reuse_and_table_know_the_protocol(tmp_path, make_editor):
    directory = tmp_path / "ft"
    save_editor(make_editor("ft", steps=0), directory)
    from metaedit.editors.io import editor_digest

    cfg = OmegaConf.create({"data": {"name": "synthetic"}, "split": "test", "limit": 5, "fluency_tokens": 0,
                            "protocol": "sequential", "n": 5, "batch": 1})
    report = {"data": "synthetic", "split": "test", "limit": 5, "fluency_tokens": 0, "records_digest": "r",
              "editor_digest": editor_digest(directory), "metrics": {"fwd_bwd_ms": 1.0},
              "protocol": "sequential", "n": 5, "batch": 1}
    assert _same_eval(report, cfg, "r", directory)
    assert not _same_eval({**report, "protocol": "batch", "batch": 1}, cfg, "r", directory)
    assert not _same_eval({**report, "batch": 5}, cfg, "r", directory)
    assert protocol_tag(Protocol("sequential", 5, 1)) == "-seq5x1" and protocol_tag(Protocol()) == ""
    doc = {"model": "m", "data": "d", "split": "test", "limit": 5, "mode": "exact", "command": "c", "rows": [],
           "protocol": "batch", "n": 5, "batch": 1}
    assert "protocol=batch n=5" in markdown_table(doc).splitlines()[0]


def test_grouped_edits_leave_out_locality_inputs_about_subjects_the_group_edits(tiny, make_data):
    from metaedit.data.datamodule import EditCollator
    from metaedit.models.loading import make_formatter

    model, tok, cfg = tiny("tiny-gpt2")
    f = make_formatter(model, tok, cfg)
    records = make_data(f).records("test")
    group = records[:8]  # two subjects, four relations each
    subjects = {r["subject"] for r in group}
    alone = [p for r in group for p in EditCollator(f, sample=False)([r]).loc_prompts]
    together = EditCollator(f, sample=False)(group).loc_prompts
    assert any(any(s in p for s in subjects) for p in alone)  # single edits keep their hard negatives
    assert together and not any(any(s in p.split() for s in subjects) for p in together)
    assert set(together) <= set(alone)


def test_forward_backward_reference_in_row_chunks_leaves_the_model_as_it_was(make_editor):
    """The yardstick of a 1000-edit batch goes max_rows rows at a time (one pass held >20 GB on
    SmolLM2): every chunk's backward runs, and gradients and requires_grad flags are put back."""
    from metaedit.metrics import time_forward_backward

    ed = make_editor("ft", "tiny-gpt2")
    prompt = f"The capital of {SUBJECT} is"
    batch = EditCollator(ed.formatter, sample=False)([_record(prompt, o) for o in WORLD.objects["capital"][:5]]).edit
    flags = [p.requires_grad for p in ed.model.parameters()]
    backwards = []
    handle = ed.model.get_output_embeddings().register_full_backward_hook(lambda m, gi, go: backwards.append(1))
    try:
        assert time_forward_backward(ed.model, batch, max_rows=2) > 0
    finally:
        handle.remove()
    assert len(backwards) == 3  # rows 0-1, 2-3, 4
    assert [p.requires_grad for p in ed.model.parameters()] == flags
    assert all(p.grad is None for p in ed.model.parameters())
