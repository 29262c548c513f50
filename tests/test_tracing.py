"""Causal tracing on tiny models trained on the synthetic world, and edit.py / load_editor with
method=rome (a hyper-parameter "checkpoint" written by train.py)."""

from __future__ import annotations

import json

import pytest
import torch

from metaedit.tracing import ROLES, average_by_role, trace_prompt
from tests.conftest import run_cli

PROMPT, SUBJECT = "The capital of Fasklorul is", "Fasklorul"


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_trace_locates_the_fact_at_the_last_token(tiny, model_name):
    """The tiny models move the subject to the last token in block 0 and recall there: restoring the
    last token's clean state undoes most of the corruption, restoring tokens before the subject does
    nothing. The heatmap is finite, [layers, tokens], and peaks at a subject or the last token."""
    model, tok, _ = tiny(model_name)
    t = trace_prompt(model, tok, PROMPT, SUBJECT, samples=5, window=2)
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    assert t.tokens[t.subject[0]].strip() == SUBJECT
    assert t.p_clean > 0.9 and t.p_corrupt < t.p_clean - 0.3  # the corruption hides the fact
    for kind, effect in t.effects.items():
        assert effect.shape == (n_layers, len(t.tokens)) and torch.isfinite(effect).all(), kind
        assert effect[:, : t.subject[0]].abs().max() < 1e-4  # states before the subject are never corrupted
    residual = t.effects["residual"]
    peak_token = int(residual.max(0).values.argmax())
    assert peak_token in (*range(t.subject[0], t.subject[1] + 1), len(t.tokens) - 1)
    assert residual[0, -1] > 0.5 * (t.p_clean - t.p_corrupt)
    avg = average_by_role([t, trace_prompt(model, tok, "The capital of Zalklothros is", "Zalklothros", samples=3,
                                           window=2)])
    assert avg["mlp"].shape == (n_layers, len(ROLES)) and torch.isfinite(avg["mlp"][:, ROLES.index("last token")]).all()


@pytest.mark.slow
def test_trace_cli_writes_heatmaps(tmp_path):
    res = run_cli(["trace.py", "model=tiny-gpt2", f"prompt={PROMPT}", f"subject={SUBJECT}", "samples=3", "window=2"],
                  tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "logs" / "trace"
    assert {p.name for p in out.glob("*.png")} == {f"trace-tiny-gpt2-{k}.png" for k in ("residual", "mlp", "attn")}
    data = json.loads((out / "trace-tiny-gpt2.json").read_text())
    assert len(data["indirect_effect"]["residual"]) == 4


@pytest.mark.slow
def test_edit_cli_and_load_editor_with_rome(tmp_path):
    # v_steps 60: the tiny model is trained on each machine, and the one an AVX2-only EPYC builds needs more
    # than the default 20 Adam steps on δ for this edit to land (20 missed it there, 60 land it).
    res = run_cli(["train.py", "method=rome", "model=tiny-gpt2", "data=synthetic", "logger=none",
                   "evaluate_after=false", "method.editor.stats.n_tokens=3000", "method.editor.v_steps=60"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "checkpoints" / "rome-tiny-gpt2-synthetic"
    cfg = json.loads((run / "best" / "editor_config.json").read_text())
    assert cfg["method"] == "rome" and cfg["hparams"]["layers"] == [1] and cfg["hparams"]["fact_token"] == "last"
    res = run_cli(["edit.py", f"editor={run}", f"prompt={PROMPT}", "target=Basdri",
                   "unrelated=[The capital of Toudu is]"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    edit = next(b for b in res.stdout.split("\n[") if b.startswith("edit"))
    assert "(answers target)" in edit
    assert "(answer unchanged" in next(b for b in res.stdout.split("\n[") if b.startswith("unrelated"))

    from metaedit.editors.io import load_editor

    editor = load_editor(run)
    assert editor.method == "rome" and not editor.trainable() and editor.layers == [1]
