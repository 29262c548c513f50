"""bench.py: reuse of saved evaluations only for the same settings, records and checkpoint; users' own data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from metaedit.bench import _same_eval, run_bench
from metaedit.data.readers import read_records
from metaedit.data.records import digest
from metaedit.editors.io import editor_digest, save_editor
from metaedit.editors.registry import EDITORS
from metaedit.models.loading import CONFIG_DIR
from metaedit.system import Lifelong


def test_saved_evaluation_is_reused_only_for_same_records_and_checkpoint(tmp_path, make_editor):
    directory = tmp_path / "ft"
    save_editor(make_editor("ft", steps=0), directory)
    cfg = OmegaConf.create({"data": {"name": "worldfacts"}, "split": "test", "limit": 5, "fluency_tokens": 0})
    records = digest([{"case_id": "capital:France"}])
    report = {"data": "worldfacts", "split": "test", "limit": 5, "fluency_tokens": 0, "records_digest": records,
              "editor_digest": editor_digest(directory), "metrics": {"fwd_bwd_ms": 1.0}}
    assert _same_eval(report, cfg, records, directory, {})
    # Other records (e.g. the split rebuilt in another order) or another limit: measure again.
    assert not _same_eval(report, cfg, digest([{"case_id": "capital:Spain"}]), directory, {})
    assert not _same_eval(report, OmegaConf.merge(cfg, {"limit": 6}), records, directory, {})
    # Another override of the saved hyper-parameters (evaluate.py hparams): measure again.
    assert not _same_eval(report, cfg, records, directory, {"edit_scale": 2.0})
    assert _same_eval({**report, "hparams_override": {"edit_scale": 2.0}}, cfg, records, directory, {"edit_scale": 2.0})
    # The checkpoint was replaced since (here: other hyper-parameters): measure again.
    save_editor(make_editor("ft", steps=3), directory)
    assert not _same_eval(report, cfg, records, directory, {})


def _counterfact(i: int, subject: str, new: str, true: str) -> dict:
    return {
        "case_id": i,
        "requested_rewrite": {"prompt": "The capital of {} is", "subject": subject, "relation_id": "P36",
                              "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"{subject}'s capital city is"],
        "neighborhood_prompts": ["The capital of Peru is"],
        "neighborhood_answers": ["Lima"],
    }


def test_bench_evaluates_on_the_users_own_data(tmp_path):
    # A directory name with a space: the data settings must reach the evaluation process intact.
    data = tmp_path / "my counterfact"
    data.mkdir()
    places = [("France", "Rome", "Paris"), ("Spain", "Oslo", "Madrid"), ("Japan", "Cairo", "Tokyo"),
              ("Chile", "Bern", "Santiago")]
    for split in ("train", "val", "test"):
        records = [_counterfact(i, *p) for i, p in enumerate(places)]
        (data / f"{split}.json").write_text(json.dumps(records))
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=["data=counterfact", f"data.path={data}", "model=tiny-gpt2", "methods=[base]",
                                          "limit=3", "fluency_tokens=0", f"paths.root_dir={tmp_path}",
                                          f"out={tmp_path}/bench"])
    doc = run_bench(cfg)
    (row,) = doc["rows"]
    assert row["method"] == "base" and row["status"] == "ok", row
    assert row["n_edits"] == 3
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["data"] == "counterfact" and saved["rows"][0]["n_edits"] == 3
    # Measured on these records: the evaluation process read the same first 3 test records.
    report = json.loads((tmp_path / "checkpoints" / "bench" / "tiny-gpt2-counterfact" / "base-eval.json").read_text())
    assert report["records_digest"] == digest(read_records(data / "test.json", "counterfact")[:3])


def test_scaling_plot_joins_protocols_into_curves(tmp_path):
    """es / ns against the number of edits: single runs are N = 1 of every curve, batch and
    sequential runs are separate curves, other models' or data's results stay out."""
    from metaedit.bench import scaling_plot, scaling_points

    def doc(protocol: str, n: int, batch: int, rows: list[tuple[str, float, float]], data: str = "d") -> dict:
        return {"model": "m", "data": data, "limit": 100, "protocol": protocol, "n": n, "batch": batch,
                "rows": [{"method": name, "status": "ok", "es": es, "ns": ns} for name, es, ns in rows]
                + [{"method": "enn", "status": "no trained checkpoint"}]}

    docs = {"": doc("single", 1, 1, [("memit", 1.0, 0.85), ("rome", 1.0, 0.83)]),
            "-batch100": doc("batch", 100, 1, [("memit", 0.99, 0.75)]),
            "-batch10": doc("batch", 10, 1, [("memit", 1.0, 0.80)]),
            "-seq100x10": doc("sequential", 100, 10, [("rome", 0.6, 0.5)])}
    series = scaling_points(list(docs.values()))
    assert series[("memit", "batch")] == [(1, 1.0, 0.85, 100), (10, 1.0, 0.80, 100), (100, 0.99, 0.75, 100)]
    assert series[("rome", "sequential, 10 per step")] == [(1, 1.0, 0.83, 100), (100, 0.6, 0.5, 100)]
    assert set(series) == {("memit", "batch"), ("rome", "sequential, 10 per step")}  # a method measured only singly makes no curve
    out = tmp_path / "bench-m-d"
    for tag, d in docs.items():
        (tmp_path / f"bench-m-d{tag}.json").write_text(json.dumps(d))
    (tmp_path / "bench-m-d_wide-batch100.json").write_text(json.dumps(doc("batch", 100, 1, [("x", 0, 0)], "d_wide")))
    assert scaling_plot(out, "m", "d") == tmp_path / "bench-m-d-scaling.png"
    assert (tmp_path / "bench-m-d-scaling.png").stat().st_size > 0
    assert scaling_plot(tmp_path / "bench-m-other", "m", "other") is None


def test_a_nested_bench_override_changes_one_setting_and_keeps_the_others():
    """`+overrides.memit.stats.precision=fp32` (and variants' overrides) reach the editor merged key by
    key into configs/method/memit.yaml: the file's other statistics settings survive."""
    from metaedit.bench import _method_hparams

    plain = _method_hparams("memit")
    tuned = _method_hparams("memit", OmegaConf.create({"stats": {"precision": "fp32", "n_tokens": 5000},
                                                        "mom2_update_weight": 2000, "layers": [2, 3]}))
    assert tuned["stats"] == {**plain["stats"], "precision": "fp32", "n_tokens": 5000}
    assert plain["stats"]["precision"] == "auto" and plain["stats"]["on_mismatch"] == "rebuild"
    assert (tuned["mom2_update_weight"], tuned["layers"]) == (2000, [2, 3])
    assert {k: v for k, v in tuned.items() if k not in ("stats", "mom2_update_weight", "layers")} == \
        {k: v for k, v in plain.items() if k not in ("stats", "mom2_update_weight", "layers")}


def test_a_variant_trained_on_other_data_keeps_this_benchmarks_test_out(tmp_path):
    """`variants.X.train_data`: the editor trains on another dataset, with the benchmark's val/test
    prompts and subjects dropped from it (data.keep_out), and is then scored on the benchmark's records."""
    from metaedit.data.synthetic import build_world, edit_records

    world = build_world(seed=0, n_subjects=200)  # the tiny models' world (data=synthetic)
    subjects = [s for s in world.subjects if world.split_of[s] == "train"][:4]
    data = tmp_path / "cf"
    data.mkdir()
    for split in ("train", "val", "test"):
        records = [_counterfact(i, s, world.facts[(subjects[i - 1], "capital")], world.facts[(s, "capital")])
                   for i, s in enumerate(subjects)]
        (data / f"{split}.json").write_text(json.dumps(records))
    fast = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=none",
            "trainer.enable_progress_bar=false"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "data=counterfact", f"data.path={data}", "model=tiny-gpt2", "methods=[mend_other]", "limit=2",
            "fluency_tokens=0", f"paths.root_dir={tmp_path}", f"out={tmp_path}/bench", "train_missing=true",
            "+variants.mend_other.method=mend", "+variants.mend_other.run_name=mend-other",
            "+variants.mend_other.train_data=synthetic", f"+variants.mend_other.train={fast}"])
    (row,) = run_bench(cfg)["rows"]
    assert row["status"] == "ok" and row["n_edits"] == 2, row
    built = tmp_path / "data" / "synthetic-s0-n200-v2-keepout-counterfact-val-test"
    train = json.loads((built / "train.json").read_text())
    plain = edit_records(world, "train")  # what data=synthetic trains on without keep_out
    def names(r: dict, s: str) -> bool:
        texts = [r["prompt"], *r["rephrases"], *(x["prompt"] for x in r["locality"])]
        return any(re.search(rf"(?<!\w){re.escape(s)}(?!\w)", t) for t in texts)

    assert sum(any(names(r, s) for s in subjects) for r in plain) >= 4
    assert train and not [r for r in train if any(names(r, s) for s in subjects)]

    # A variant of the same checkpoint with a saved hyper-parameter changed at load time
    # (`variants.X.hparams`, evaluate.py `hparams`): evaluated with it, never reusing the plain row.
    # Merged into the saved table (merge=true): rows keep their place, a new one follows.
    with open_dict(cfg):
        cfg.methods = ["mend_other_x2"]
        cfg.variants.mend_other_x2 = {"method": "mend", "run_name": "mend-other", "hparams": {"edit_scale": 2.0}}
        cfg.reuse, cfg.merge = True, True
    rows = run_bench(cfg)["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("mend_other", "ok"), ("mend_other_x2", "ok")], rows
    cfg.methods = ["mend_other"]  # re-run (here: reused) the first row: the order stays
    assert [r["method"] for r in run_bench(cfg)["rows"]] == ["mend_other", "mend_other_x2"]
    work = tmp_path / "checkpoints" / "bench" / "tiny-gpt2-counterfact"
    plain_report = json.loads((work / "mend_other-eval.json").read_text())
    scaled_report = json.loads((work / "mend_other_x2-eval.json").read_text())
    assert "hparams_override" not in plain_report and scaled_report["hparams_override"] == {"edit_scale": 2.0}
    assert "overriding saved hyper-parameters {'edit_scale': 2.0}" in (work / "mend_other_x2-eval.log").read_text()


def test_every_variants_training_command_composes():
    """Each `variants.X.train` in bench.yaml is the train.py command that made that row's checkpoint
    (and what train_missing=true runs): it must compose against train.py's configs — a misspelt key
    would otherwise fail only when a benchmark reaches it, hours in — and its lifelong settings, where it
    has them, must be ones training accepts."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        variants = compose("bench").variants
        lifelong_rows, runs, starts = [], set(), {}
        for name, variant in variants.items():
            data = [f"data={variant.train_data}"] if variant.get("train_data") else []
            run = [f"run_name={variant.run_name}"] if variant.get("run_name") else []
            cfg = compose("train", overrides=[f"method={variant.method}", *data, *run, *variant.get("train", [])])
            assert cfg.method.name == variant.method and variant.method in EDITORS, name
            if cfg.method.loss.get("lifelong") is not None:
                lifelong_rows.append((name, Lifelong(**cfg.method.loss.lifelong)))
            runs |= {cfg.run_name, compose("train", overrides=[f"method={variant.method}", *data]).run_name}
            if cfg.get("init_from"):
                starts[name] = Path(cfg.init_from)
        assert [n for n, _ in lifelong_rows] == ["malmen_lifelong", "malmen_lifelong_ws"]
        # A row started from another editor (init_from) names a run the benchmark itself trains.
        assert starts and all(p.name == "best" and p.parent.name in runs for p in starts.values()), starts
        # What the check above rests on: a key train.py's config does not have is refused.
        with pytest.raises(ConfigCompositionException):
            compose("train", overrides=["method=malmen", "method.loss.lifelong_steps=3"])
