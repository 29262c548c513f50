"""train.py / evaluate.py end to end: config errors, resume after a kill, DDP on CPU, metrics JSON."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from metaedit.paths import default_cache_dir
from tests.conftest import ROOT, run_cli

FAST = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "eval_limit=4",
        "logger=none", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "override,valid",
    [("method=nope", ["ft", "ftl", "mend"]), ("model=nope", ["tiny-gpt2", "t5-xxl"]), ("data=nope", ["synthetic"])],
)
def test_unknown_names_list_the_valid_ones(tmp_path, override, valid):
    res = run_cli(["train.py", override, *FAST], tmp_path)
    assert res.returncode != 0
    group = override.split("=")[0]
    assert f"Could not find '{group}/nope'" in res.stderr
    for v in valid:
        assert v in res.stderr


@pytest.mark.slow
def test_train_then_evaluate_writes_metrics(tmp_path):
    res = run_cli(["train.py", "method=mend", "model=tiny-gpt2", "data=synthetic", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "checkpoints" / "mend-tiny-gpt2-synthetic"
    assert (run / "best" / "editor.safetensors").is_file() and (run / "last.ckpt").is_file()
    res = run_cli(["evaluate.py", f"editor={run}", "data=synthetic", "split=test", "limit=6",
                   f"output={tmp_path}/m.json"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["mode"] == "exact" and report["split"] == "test" and report["metrics"]["n_edits"] == 6
    for key in ("edit_acc", "rephrase_acc", "loc_retain", "drawdown", "edit_ms", "peak_mem_mb", "es", "ps", "ns", "score"):
        assert key in report["metrics"]
    assert "exact mode" in res.stdout and "token mode" in res.stdout
    # Per relation too (one edit per batch: each batch is one record), adding up to the whole split.
    per = report["by_relation"]
    assert len(per) > 1 and sum(r["n_edits"] for r in per.values()) == 6
    assert report["records_digest"] and report["editor_digest"]


def test_evaluate_refuses_a_missing_editor(tmp_path):
    res = run_cli(["evaluate.py", f"editor={tmp_path}/none"], tmp_path)
    assert res.returncode == 2 and "editor directory not found" in res.stderr


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tmp_path):
    args = [sys.executable, "train.py", "method=mend", "model=tiny-gpt2", "trainer.max_steps=400",
            "checkpoint_every_n_steps=4", "trainer.val_check_interval=1000", "evaluate_after=false", "logger=none",
            "trainer.enable_progress_bar=false", "data=synthetic", f"paths.root_dir={tmp_path}"]
    last = tmp_path / "checkpoints" / "mend-tiny-gpt2-synthetic" / "last.ckpt"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not last.is_file():
            time.sleep(0.5)
        assert last.is_file(), "no checkpoint written"
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 0 < killed_at < 400
    assert not any(k.startswith("base.") for k in torch.load(last, weights_only=True)["state_dict"])

    res = subprocess.run([*args[:4], f"trainer.max_steps={killed_at + 8}", *args[5:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {last}" in res.stderr + res.stdout
    assert "Restored all states from the checkpoint" in res.stderr + res.stdout
    final = torch.load(last, weights_only=True)["global_step"]
    assert final == killed_at + 8


@pytest.mark.slow
def test_ddp_cpu_trains_a_few_steps(tmp_path):
    res = run_cli(["train.py", "trainer=ddp_cpu", "method=mend", "model=tiny-gpt2", "data=synthetic", *FAST], tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out
    assert (tmp_path / "checkpoints" / "mend-tiny-gpt2-synthetic" / "best" / "editor.safetensors").is_file()


def test_ft_has_nothing_to_train_but_is_evaluated(tmp_path):
    res = run_cli(["train.py", "method=ft", "model=tiny-gpt2", "data=synthetic", "eval_limit=3", "logger=none"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "has nothing to train" in res.stderr + res.stdout
    assert "ft on tiny-gpt2 / synthetic:test (3 edits" in res.stdout


@pytest.mark.slow
def test_wandb_logger_goes_offline_when_not_logged_in(tmp_path):
    env_home = tmp_path / "home"
    env_home.mkdir()
    # HOME is moved (no W&B login there); the model cache stays where the other tests built it.
    res = run_cli(["train.py", "logger=wandb", "model=tiny-gpt2", "data=synthetic", *[a for a in FAST if a != "logger=none"]],
                  tmp_path, env={**os.environ, "HOME": str(env_home), "WANDB_API_KEY": "", "WANDB_SILENT": "true",
                                 "METAEDIT_CACHE": str(default_cache_dir())})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    assert "wandb sync" in res.stdout + res.stderr


def test_training_logs_progress_lines_without_a_bar_when_not_a_terminal(tmp_path):
    # The progress bar is left on: with stdout a pipe it is turned off, and log lines report progress.
    fast = [a for a in FAST if a != "trainer.enable_progress_bar=false"]
    res = run_cli(["train.py", "method=mend", "model=tiny-gpt2", "data=synthetic", *fast, "progress_every_n_steps=2",
                   "trainer.precision=32-true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert re.search(r"step 2/6 \(33\.3%\) (?:[\d.]+ it/s|[\d.]+ s/it) ETA \S+ train/loss [\d.]+", out), out[-3000:]
    assert re.search(r"step 4/6 \(66\.7%\) .* val/loss [\d.]+", out)  # the latest validation's loss
    assert re.search(r"validation at step 3 \(\S+\): .*val/edit_acc [\d.]+ .*val/loss [\d.]+", out)
    assert "Epoch 0" not in out  # no bar drawn into the pipe
    assert "precision auto" not in out  # an explicit precision is used as given


def test_continued_training_adds_the_earlier_training_time(tmp_path):
    """A run continued from its last.ckpt with a larger max_steps reports the whole run's training
    time (earlier process + this one) in train_info.json, and says how much came before; continuing
    it under other method settings is refused."""
    base = ["train.py", "method=mend", "model=tiny-gpt2", "data=synthetic", "evaluate_after=false", "logger=none",
            "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false"]
    info_path = tmp_path / "checkpoints" / "mend-tiny-gpt2-synthetic" / "train_info.json"
    res = run_cli([*base, "trainer.max_steps=2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    first = json.loads(info_path.read_text())
    assert first["steps"] == 2 and "resumed_after_seconds" not in first
    res = run_cli([*base, "trainer.max_steps=4"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    second = json.loads(info_path.read_text())
    assert second["steps"] == 4 and second["resumed_after_seconds"] == first["train_seconds"]
    assert second["train_seconds"] > first["train_seconds"]
    # Other method settings under the same run_name: resuming would continue the old editor under a
    # config that names another, so it is refused and the run's saved config stays as it was.
    saved = (info_path.parent / "train_config.yaml").read_text()
    res = run_cli([*base, "trainer.max_steps=6", "method.loss.c_loc=7.5"], tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "was trained with other settings" in res.stderr and "method.loss.c_loc" in res.stderr
    assert "-> 7.5" in res.stderr and "resume=false" in res.stderr
    assert (info_path.parent / "train_config.yaml").read_text() == saved


def test_resuming_accepts_settings_added_after_the_run_only_at_their_off_value(tmp_path):
    """A run saved before an option existed resumes under it at its off default (same behaviour);
    switched on, it is a change and refused."""
    from omegaconf import OmegaConf

    from metaedit.training import _refuse_resuming_other_settings
    from metaedit.types import MetaEditError

    OmegaConf.save(OmegaConf.create({"method": {"loss": {"c_loc": 1.0}}, "data": {"n_edits": 2}, "seed": 0}),
                   tmp_path / "train_config.yaml")
    same = {"method": {"loss": {"c_loc": 1.0, "c_ns": 0.0}}, "data": {"n_edits": 2, "train_edit_prompt": False}, "seed": 0}
    _refuse_resuming_other_settings(tmp_path, OmegaConf.create(same))
    on = {**same, "data": {"n_edits": 2, "train_edit_prompt": True}}
    with pytest.raises(MetaEditError, match=r"data.train_edit_prompt: '\(unset\)' -> True"):
        _refuse_resuming_other_settings(tmp_path, OmegaConf.create(on))


def test_init_from_starts_a_run_from_a_saved_editors_tensors(tmp_path):
    """`init_from` loads a saved editor's tensors into a new run (at learning rate 0 they come out
    unchanged, where a fresh run's differ); an editor of another shape is refused by name."""
    from safetensors.torch import load_file

    base = ["train.py", "method=mend", "model=tiny-gpt2", "data=synthetic", "evaluate_after=false", "logger=none",
            "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false", "trainer.max_steps=2"]
    runs = tmp_path / "checkpoints"
    res = run_cli([*base, "run_name=first"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    first = load_file(str(runs / "first" / "best" / "editor.safetensors"))
    for name, extra in (("continued", [f"init_from={runs / 'first' / 'best'}"]), ("fresh", [])):
        res = run_cli([*base, f"run_name={name}", "method.optim.lr=0.0", *extra], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    continued = load_file(str(runs / "continued" / "best" / "editor.safetensors"))
    fresh = load_file(str(runs / "fresh" / "best" / "editor.safetensors"))
    assert continued.keys() == first.keys()
    # The networks' weights and step sizes (lr 0: unchanged); their running input statistics carry on
    # counting from the saved ones (the same data, so the saved count plus a fresh run's).
    counts = [k for k in first if k.endswith(".count")]
    weights = [k for k in first if ".norms." not in k]
    assert counts and weights
    assert all(torch.equal(continued[k], first[k]) for k in weights)
    assert not all(torch.equal(fresh[k], first[k]) for k in weights)
    assert all(torch.equal(continued[k], first[k] + fresh[k]) for k in counts)
    res = run_cli([*base, "run_name=other", "method.editor.rank=3", f"init_from={runs / 'first' / 'best'}"], tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "init_from=" in res.stderr and "do not fit this run's mend editor" in res.stderr
    res = run_cli([*base, "run_name=other", "method=ft", f"init_from={runs / 'first' / 'best'}"], tmp_path)
    assert res.returncode != 0 and "a mend editor cannot start a ft run" in res.stderr
    # MALMEN extends MEND: it may start from a trained MEND (same networks and step sizes, its own
    # regularisers λ at lambda_init); the other way round is refused.
    same = ["model.inner_params=[{container: transformer.h, layers: [0, 1, 2, 3], pattern: 'mlp\\.(c_fc|c_proj)'}]",
            "method.editor.rank=128", "method.editor.rows=target", "method.editor.lambda_init=1.5"]
    res = run_cli([*base, "run_name=malmen", "method=malmen", "method.optim.lr=0.0", *same,
                   f"init_from={runs / 'first' / 'best'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    malmen = load_file(str(runs / "malmen" / "best" / "editor.safetensors"))
    assert set(malmen) == set(first) | {"log_lambdas"}
    assert all(torch.equal(malmen[k], first[k]) for k in weights)
    assert torch.equal(malmen["log_lambdas"], torch.full_like(malmen["log_lambdas"], 1.5))
    res = run_cli([*base, "run_name=other", f"init_from={runs / 'malmen' / 'best'}"], tmp_path)
    assert res.returncode != 0 and "a malmen editor cannot start a mend run" in res.stderr
