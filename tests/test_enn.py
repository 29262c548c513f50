"""ENN: the meta-gradient is what its definition says (second and first order), a zero step is a
no-op, eager attention is selected for it, and its checkpoint is the trained subset only."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import types
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn

from metaedit import load_editor
from metaedit.callbacks import ProgressLog
from metaedit.editors.enn import ENNEditor
from metaedit.editors.io import CONFIG, WEIGHTS, build_editor, model_config_for
from metaedit.functional import forward_logits
from metaedit.losses import exact_correct, nll
from metaedit.models.inner_params import InnerParam
from metaedit.models.loading import load_model_config
from metaedit.system import EditorSystem
from metaedit.types import LMBatch, MetaEditError
from tests.test_editors import TEST_SUBJECTS, assert_unchanged, requests, snapshot


class TinyMLP(nn.Module):
    """A token-wise MLP LM: embeddings -> tanh(fc1) -> fc2 -> tied-free head. Smooth everywhere, so
    finite differences in float64 are accurate to ~1e-8."""

    def __init__(self, vocab: int = 11, d: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        return self.head(h + self.fc2(torch.tanh(self.fc1(h))))


def lm_batch(ids: list[list[int]], targets: list[list[int]]) -> LMBatch:
    ids_t = torch.tensor(ids)
    mask = torch.ones_like(ids_t)
    return LMBatch(ids_t, mask, torch.tensor(targets), mask.clone())


def mlp_editor(**hparams) -> ENNEditor:
    torch.manual_seed(0)
    model = TinyMLP().double().requires_grad_(False)
    inner = [InnerParam("fc1.weight", "fc1", 6, 8, False, "output"), InnerParam("fc2.weight", "fc2", 8, 6, False, "output")]
    ed = ENNEditor(model, inner, **hparams).double()
    with torch.no_grad():  # a "meta-trained" θ away from the base, and distinct step sizes
        for p in ed.theta:
            p.add_(0.1 * torch.randn_like(p))
        ed.log_lrs.copy_(torch.tensor([0.3, 0.7]).log())
    return ed


EDIT = lm_batch([[1, 2, 3], [4, 5, 6]], [[-100, 7, 8], [-100, -100, 9]])
INSCOPE = lm_batch([[2, 1, 3, 5]], [[-100, 7, 8, -100]])


def outer_loss(ed: ENNEditor) -> torch.Tensor:
    return nll(ed.apply_edits(EDIT, []).logits(INSCOPE), INSCOPE.targets)


def finite_difference(ed: ENNEditor, tensor: torch.Tensor, index: tuple[int, ...], fn, eps: float = 1e-6) -> float:
    with torch.no_grad():
        old = tensor[index].item()
        tensor[index] = old + eps
        up = fn(ed).item()
        tensor[index] = old - eps
        down = fn(ed).item()
        tensor[index] = old
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("n_steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(n_steps):
    ed = mlp_editor(n_steps=n_steps, train_pattern=r"head\.weight")
    grads = torch.autograd.grad(outer_loss(ed), [*ed.theta, ed.log_lrs])
    checked = [(ed.log_lrs, grads[-1], (0,)), (ed.log_lrs, grads[-1], (1,))]
    for t, g in zip(ed.theta, grads):  # fc1, fc2 (edited) and head (trained, not edited)
        checked += [(t, g, (0, 0)), (t, g, (t.shape[0] - 1, 2))]
    for tensor, grad, index in checked:
        fd = finite_difference(ed, tensor.data, index, outer_loss)
        assert grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_first_order_meta_gradient_matches_its_definition():
    """First order treats the inner gradient g as a constant: dL/dθ = ∂L/∂θ' (at θ') and
    dL/dlog α = ∂L/∂θ' · (−α g), the exact derivative in α for one step."""
    ed = mlp_editor(first_order=True)
    grads = torch.autograd.grad(outer_loss(ed), [*ed.theta, ed.log_lrs])
    for i in range(2):
        assert grads[-1][i].item() == pytest.approx(finite_difference(ed, ed.log_lrs.data, (i,), outer_loss), rel=1e-5)
    with torch.no_grad():
        post = ed.apply_edits(EDIT, []).params

    def at_post(name: str, delta: torch.Tensor):
        def fn(_: ENNEditor) -> torch.Tensor:
            return nll(forward_logits(ed.model, INSCOPE, {**post, name: post[name] + delta}), INSCOPE.targets)
        return fn

    for k, (name, t) in enumerate(zip(ed.trained_names, ed.theta)):
        delta = torch.zeros_like(t)
        fd = finite_difference(ed, delta, (1, 1), at_post(name, delta))
        assert grads[k][1, 1].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
    exact = mlp_editor()  # same θ and α, second order: the two meta-gradients really differ
    assert not torch.allclose(grads[0], torch.autograd.grad(outer_loss(exact), exact.theta[0])[0], rtol=1e-3)


def test_zero_step_size_leaves_outputs_unchanged():
    ed = mlp_editor(n_steps=2)
    with torch.no_grad():
        ed.log_lrs.fill_(float("-inf"))  # α = exp(−inf) = 0 exactly
    edited = ed.apply_edits(EDIT, [])
    assert torch.equal(edited.logits(INSCOPE), forward_logits(ed.model, INSCOPE, ed.current_params()))
    assert torch.equal(edited.logits(INSCOPE), ed.base_logits(INSCOPE))  # locality is measured against θ, not θ0


def test_enn_selects_eager_attention_and_refuses_fused_attention_for_second_order(make_editor):
    cfg = load_model_config("tiny-gpt2")
    assert model_config_for("enn", cfg)["attn_implementation"] == "eager"
    assert "attn_implementation" not in model_config_for("mend", cfg)
    assert model_config_for("enn", {**cfg, "attn_implementation": "sdpa"})["attn_implementation"] == "sdpa"
    ed = make_editor("enn", "tiny-gpt2")  # the shared test fixture loads the default (SDPA) attention
    batch = ed.formatter.batch(*zip(*requests(2)))
    ed.train()
    with pytest.raises(MetaEditError, match="attn_implementation='eager'"):
        ed.apply_edits(batch, [])
    ed.first_order = True  # no double backward needed
    nll(ed.apply_edits(batch, []).logits(batch), batch.targets).backward()
    assert ed.log_lrs.grad is not None and ed.theta[0].grad is not None


def test_enn_edit_changes_the_target_and_never_the_base(make_editor):
    # Five small plain steps (untrained α): one large step lands the edit only on some builds of the
    # tiny model (they are not bit-reproducible), five steps of 0.3 take the target's NLL to ~0.04.
    ed = make_editor("enn", "tiny-gpt2", edit_lr=0.3, n_steps=5)
    before = snapshot(ed.model)
    reqs = requests(1)
    batch = ed.formatter.batch(*zip(*reqs))
    assert not exact_correct(forward_logits(ed.model, batch), batch.targets).any()
    edited = ed.edit(reqs)
    assert exact_correct(edited.logits(batch), batch.targets).all()
    assert_unchanged(ed.model, before)


def _masked_and_plain_steps(make_editor, rows, reqs):
    """A first-order ENN step (α 0.5) with `rows` and with the plain gradient on tiny-gpt2, and the oracle
    for both: every inner layer's input u and output gradient δ at every position (hooks on the model).
    The edits leave the base untouched."""
    from metaedit.hooks import capture_layer_io

    ed = make_editor("enn", "tiny-gpt2", first_order=True, rows=rows, edit_lr=0.5).eval()
    plain = make_editor("enn", "tiny-gpt2", first_order=True, edit_lr=0.5).eval()
    before = snapshot(ed.model)
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    new, new_plain = ed.apply_edits(batch, reqs).params, plain.apply_edits(batch, reqs).params
    assert_unchanged(ed.model, before)
    modules = {p.module_name: ed.model.get_submodule(p.module_name) for p in ed.inner_params}
    with torch.enable_grad(), capture_layer_io(modules) as io:
        loss = nll(forward_logits(ed.model, batch), batch.targets, reduction="sum")
        deltas = torch.autograd.grad(loss, [io[p.module_name][1] for p in ed.inner_params])
    return ed, batch, new, new_plain, io, deltas


def test_enn_subject_last_rows_step_along_the_subjects_gradient_only(make_editor):
    """rows=subject_last: θ' − θ = −α Σ_i δ_i u_iᵀ at each edit's subject's last token (the oracle:
    layer inputs and output gradients from hooks), a step that differs from the plain gradient's;
    the base is untouched, and second order with subject rows is refused."""
    from metaedit.locate.tokens import subject_token_span
    from metaedit.types import EditRequest

    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    ed, batch, new, new_plain, io, deltas = _masked_and_plain_steps(make_editor, "subject_last", reqs)
    lasts = [subject_token_span(ed.formatter.tokenizer, r.prompt, r.subject)[1] for r in reqs]
    moved = 0
    for p, d in zip(ed.inner_params, deltas):
        u = io[p.module_name][0]
        grad = sum(torch.outer(d[i, t], u[i, t]) for i, t in enumerate(lasts))  # [d_out, d_in]
        want = -0.5 * (grad.T if p.transposed else grad)
        step = new[p.name] - ed.model.get_parameter(p.name)
        assert torch.allclose(step, want, atol=1e-6 + 1e-4 * float(want.abs().max())), p.name
        if want.abs().max() > 0:
            moved += 1
            assert not torch.allclose(step, new_plain[p.name] - ed.model.get_parameter(p.name)), p.name
    assert moved > 0  # (the last block's output at the subject reaches no target: its step is 0)
    with pytest.raises(MetaEditError, match="first_order"):
        make_editor("enn", "tiny-gpt2", rows="subject_last")


def test_enn_target_rows_step_along_the_answer_positions_gradient_only(make_editor):
    """rows=target: θ' − θ = −α Σ_i Σ_t δ_it u_itᵀ over the positions whose logits score the answer
    (targets ≠ −100), not the prompt's earlier positions; a seq2seq model is refused when built."""
    from metaedit.types import EditRequest

    reqs = [EditRequest(p, t) for p, t in requests(2)]
    ed, batch, new, new_plain, io, deltas = _masked_and_plain_steps(make_editor, "target", reqs)
    answer = batch.targets != -100
    assert answer.any() and (~answer & batch.attention_mask.bool()).any()  # prompt positions exist and are left out
    differs = 0
    for p, d in zip(ed.inner_params, deltas):
        u = io[p.module_name][0]
        grad = torch.einsum("bto,bti->oi", d * answer.unsqueeze(-1), u)
        want = -0.5 * (grad.T if p.transposed else grad)
        step = new[p.name] - ed.model.get_parameter(p.name)
        assert torch.allclose(step, want, atol=1e-6 + 1e-4 * float(want.abs().max())), p.name
        differs += not torch.allclose(step, new_plain[p.name] - ed.model.get_parameter(p.name))
    assert differs > 0  # the prompt's positions carry gradient in the plain step
    with pytest.raises(MetaEditError, match="causal LMs"):
        make_editor("enn", "tiny-t5", first_order=True, rows="target")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_enn_checkpoint_round_trips_and_holds_only_the_trained_subset(make_editor, tiny, tmp_path, name, record_property):
    ed = make_editor("enn", name, train_pattern=r".*final_layer_norm\.weight|transformer\.ln_f\.weight")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ed.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model, _, _ = tiny(name)
    before = snapshot(model)
    ed.save_pretrained(str(tmp_path / "ed"))
    loaded = load_editor(tmp_path / "ed", model=model)
    for k, v in ed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    reqs = requests(2)
    a, b = ed.edit(reqs).params, loaded.edit(reqs).params
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The edited model is the meta-trained base + the edit: trained-not-edited params are in it too.
    assert set(a) == set(ed.trained_names) and len(ed.trained_names) > len(ed.inner_params)
    assert_unchanged(model, before)  # loading applies θ functionally; the base object keeps θ0

    config = assert_checkpoint_is_theta_and_step_sizes(tmp_path / "ed", model, record_property)
    assert config["hparams"]["train_pattern"]


def test_enn_init_from_a_narrower_editor_starts_the_extra_params_from_the_base(make_editor, tiny, tmp_path):
    """`init_from` a trained ENN into a run that meta-trains more base parameters (a train_pattern
    added): the saved θ is loaded, the extra θ start at the base's weights; a run meta-training fewer
    (or other) parameters than the saved editor is refused by name."""
    from metaedit.training import init_from_saved

    model, tok, _ = tiny("tiny-gpt2")
    pattern = r"transformer\.ln_f\.weight"
    narrow = make_editor("enn", "tiny-gpt2")
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(1e-3)
    narrow.save_pretrained(str(tmp_path / "narrow"))
    wide = make_editor("enn", "tiny-gpt2", train_pattern=pattern)
    init_from_saved(wide, tmp_path / "narrow", model, tok, None)
    n = len(narrow.trained_names)
    assert wide.trained_names[:n] == narrow.trained_names and len(wide.trained_names) == n + 1
    for a, b in zip(wide.theta[:n], narrow.theta):
        assert torch.equal(a, b)
    assert torch.equal(wide.log_lrs, narrow.log_lrs)
    assert torch.equal(wide.theta[n], model.get_parameter(wide.trained_names[n]).detach())

    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(MetaEditError, match="do not fit this run's enn editor"):
        init_from_saved(make_editor("enn", "tiny-gpt2"), tmp_path / "wide", model, tok, None)


def test_enn_checkpoint_of_the_inner_params_only(make_editor, tiny, tmp_path, record_property):
    ed = make_editor("enn", "tiny-gpt2")
    with torch.no_grad():
        for p in ed.theta:
            p.add_(1e-3)
    ed.save_pretrained(str(tmp_path / "ed"))
    config = assert_checkpoint_is_theta_and_step_sizes(tmp_path / "ed", tiny("tiny-gpt2")[0], record_property)
    assert config["hparams"]["train_pattern"] is None and len(ed.trained_names) == len(ed.inner_params)


def assert_checkpoint_is_theta_and_step_sizes(directory, model: nn.Module, record_property) -> dict:
    """The saved editor.safetensors holds exactly θ (one tensor per trained base parameter, the names
    given by the config: its inner params, then the base parameters train_pattern matches, in the
    base's order) and the step sizes; nothing of the base model. Returns the config."""
    saved = load_file(str(directory / WEIGHTS))
    config = json.loads((directory / CONFIG).read_text())
    assert config["method"] == "enn"
    base = dict(model.named_parameters())
    names = [p["name"] for p in config["inner_params"]]
    if config["hparams"]["train_pattern"] is not None:
        pattern = re.compile(config["hparams"]["train_pattern"])
        names += [n for n in base if pattern.fullmatch(n) and n not in names]
    assert set(saved) == {f"theta.{i}" for i in range(len(names))} | {"log_lrs"}
    assert saved["log_lrs"].shape == (len(config["inner_params"]),)  # one step size per inner tensor
    for i, n in enumerate(names):  # θ_i is the (slightly trained) copy of base parameter n
        assert saved[f"theta.{i}"].shape == base[n].shape, n
        torch.testing.assert_close(saved[f"theta.{i}"], base[n].detach(), rtol=0, atol=1e-2)
    for t in saved.values():  # trained: no tensor is a base tensor as it is
        assert not any(t.shape == w.shape and torch.equal(t, w) for w in base.values())
    # The file is these tensors plus a small header, far below the base's weights.
    size = (directory / WEIGHTS).stat().st_size
    tensor_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    base_bytes = sum(w.numel() * w.element_size() for w in base.values())
    record_property("editor_safetensors_bytes", size)
    print(f"{directory / WEIGHTS}: {size} bytes ({len(saved)} tensors, {tensor_bytes} tensor bytes; base {base_bytes})")
    assert tensor_bytes <= size < tensor_bytes + 16_384 and size < base_bytes
    return config


@pytest.mark.slow
def test_train_py_selects_eager_attention_for_enn_end_to_end(tmp_path):
    from tests.conftest import run_cli

    res = run_cli(["train.py", "method=enn", "model=tiny-gpt2", "data=synthetic", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "trainer.limit_val_batches=1", "eval_limit=2", "logger=none", "trainer.enable_progress_bar=false"],
                  tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loading the base with attn_implementation='eager'" in res.stderr + res.stdout
    config = json.loads((tmp_path / "checkpoints" / "enn-tiny-gpt2-synthetic" / "best" / CONFIG).read_text())
    assert config["base_model"]["config"]["attn_implementation"] == "eager"  # load_editor reloads it the same way
    assert "exact mode" in res.stdout


def enn_step(ed: ENNEditor, start: dict[str, torch.Tensor], req: tuple[str, str]) -> dict[str, torch.Tensor]:
    """One ENN edit by its definition, θ' = θ − α ⊙ ∇L(θ; z_e), taken at `start` instead of ENN's θ."""
    batch = ed.formatter.batch([req[0]], [req[1]])
    names = [p.name for p in ed.inner_params]
    at = {n: start[n].detach().clone().requires_grad_(True) for n in names}
    loss = nll(forward_logits(ed.model, batch, {**start, **at}), batch.targets, reduction="sum")
    grads = torch.autograd.grad(loss, list(at.values()))
    return {**start, **{n: start[n] - lr * g for n, lr, g in zip(names, ed.log_lrs.exp().detach(), grads)}}


def target_logprob(ed: ENNEditor, params: dict[str, torch.Tensor], req: tuple[str, str]) -> float:
    batch = ed.formatter.batch([req[0]], [req[1]])
    return -nll(forward_logits(ed.model, batch, params), batch.targets, reduction="sum").item()


def test_enn_sequential_edits_accumulate_and_leave_base_and_theta_unchanged(make_editor):
    ed = make_editor("enn", "tiny-gpt2", edit_lr=3.0)
    base_before, editor_before = snapshot(ed.model), snapshot(ed)
    first, second = requests(2)
    seen: list[dict[str, torch.Tensor]] = []
    final = ed.edit_sequential([first, second], after_each=lambda k, m: seen.append(dict(m.params)))

    # Edit 2 starts where edit 1 ended (θ'' = θ' − α ∇L₂(θ')), not from ENN's unedited θ.
    after_first = enn_step(ed, ed.current_params(), first)
    expected = enn_step(ed, after_first, second)
    assert set(final.params) == set(ed.trained_names)
    for n in ed.trained_names:
        torch.testing.assert_close(seen[0][n], after_first[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final.params[n], expected[n], rtol=1e-4, atol=1e-5)
    # The first edit's effect survives the second: its target is far likelier than under edit 2 alone.
    alone = ed.edit([second]).params
    assert target_logprob(ed, final.params, first) > target_logprob(ed, alone, first) + 1.0
    assert_unchanged(ed.model, base_before)
    for k, v in ed.state_dict().items():  # θ and α are back in place after the sequence
        assert torch.equal(v, editor_before[k]), k
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ed.theta)


def test_enn_step_sizes_train_at_their_own_learning_rate_and_are_logged(make_editor, make_data, caplog):
    # First order: the tiny fixture's base has SDPA attention (no double backward); α's gradient is exact.
    ed = make_editor("enn", "tiny-gpt2", edit_lr=0.5, first_order=True, step_size_lr=0.05)
    start = ed.log_lrs.detach().clone()
    system = EditorSystem(ed, lr=1e-5, weight_decay=0.1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False,
                         callbacks=[ProgressLog(every_n_steps=1)])
    with caplog.at_level(logging.INFO, logger="metaedit.callbacks"):
        trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))

    groups = trainer.optimizers[0].param_groups  # built by EditorSystem.configure_optimizers
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in ed.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable) and len(ids) == len(set(ids))  # each exactly once
    (steps,) = [g for g in groups if any(p is ed.log_lrs for p in g["params"])]
    assert len(steps["params"]) == 1 and steps["lr"] == 0.05 and steps["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-5 and g["weight_decay"] == 0.1 for g in groups if g is not steps)
    # Adam moves a parameter by about its group's lr per step: log α moved at 0.05, not at θ's 1e-5.
    assert (ed.log_lrs.detach() - start).abs().max() > 0.01

    alpha = ed.log_lrs.detach().exp()
    logged = {k[len("train/state/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/state/")}
    expected = {"step_size_mean": alpha.mean(), "step_size_min": alpha.min(), "step_size_max": alpha.max(),
                **{f"step_size/{p.name}": a for p, a in zip(ed.inner_params, alpha)}}
    assert logged.keys() == expected.keys()
    for k, v in expected.items():  # the values after the last optimizer step
        assert logged[k] == pytest.approx(float(v), rel=1e-6), k
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2/2")]
    # Progress lines carry the summaries, not the per-tensor details.
    assert re.search(r" state/step_size_max \S+ state/step_size_mean \S+ state/step_size_min \S+$", lines[0]), lines


@dataclasses.dataclass
class PreserveWorld:
    """A tiny-llama, its down_proj matrices, a training split of capital facts (one of them about the
    first test subject, which an edit of that subject must never preserve) and two edit requests."""

    model: Any
    tok: Any
    cfg: dict
    inner: list
    stats: dict
    spec: dict
    reqs: list
    layers: list[int]
    moments: dict[int, torch.Tensor]  # the layers' key second moments, as the whitening reads them


def preserve_world(tiny, tmp_path) -> PreserveWorld:
    from metaedit.locate.stats import StatsSpec, second_moments
    from metaedit.models.inner_params import resolve_inner_params
    from metaedit.types import EditRequest
    from tests.test_editors import WORLD
    from tests.test_malmen import _fact_records

    model, tok, cfg = tiny("tiny-llama")
    data = tmp_path / "data"
    data.mkdir()
    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:12]
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects + TEST_SUBJECTS[:1])))
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    stats = {"n_tokens": 3000, "seq_len": 64}
    layers = [int(p.module_name.split(".")[2]) for p in inner]
    moments = second_moments(model, tok, sorted(set(layers)), StatsSpec(**stats), tmp_path)
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    spec = {"data": str(data), "weight": 1.0, "top_k": 3, "max_facts": None}
    return PreserveWorld(model, tok, cfg, inner, stats, spec, reqs, layers, moments)


def test_enn_preserve_steps_along_the_whitening_with_the_nearest_training_keys(tiny, tmp_path):
    """preserve: ENN's step is G A_P · ⟨G, G⟩/⟨G, G A_P⟩ with A_P = (C_ρ + μ K_PᵀK_P)⁻¹, K_P the training
    facts' answer-position keys nearest the edit's (top_k per row, never a fact about an edited subject,
    nor, in training, one whose prompt the outer loss scores); with a large μ the preserved keys'
    outputs barely move while the edit's still do; bad settings are refused; the setting round-trips."""
    from metaedit.editors.rows import per_edit_gradients
    from metaedit.locate.solve import regularised

    w = preserve_world(tiny, tmp_path)
    model, tok, cfg, inner, reqs, spec = w.model, w.tok, w.cfg, w.inner, w.reqs, w.spec
    hp = {"edit_lr": 0.3, "first_order": True, "rows": "target", "key_whitening": 1e-2, "stats": w.stats}
    white = build_editor("enn", model, cfg, hp, tokenizer=tok, inner_params=inner, cache_dir=tmp_path)
    ed = build_editor("enn", model, cfg, {**hp, "preserve": spec}, tokenizer=tok, inner_params=inner, cache_dir=tmp_path)
    ed.prepare()
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    keys: list[torch.Tensor] = []
    grads = per_edit_gradients(model, inner, batch, "target", ed.formatter, reqs, summed=True, keys=keys)
    bank = ed.preserve
    excluded = bank.excluded_rows([r.subject for r in reqs], batch.prompts)
    layers, moments = w.layers, w.moments
    with torch.no_grad():
        step, plain_step = ed.apply_edits(batch, reqs).params, white.apply_edits(batch, reqs).params
    for i, (p, ell, g) in enumerate(zip(inner, layers, grads)):
        rows = bank.nearest(i, keys[i], excluded).unique()
        assert len(rows) and not any(TEST_SUBJECTS[0] in bank.facts[int(j)].prompt for j in bank._fact_of_row[rows])
        kp = bank._keys[i][rows].double()
        a_p = torch.linalg.inv(regularised(moments[ell], 1e-2) + kp.T @ kp)
        gd = g.double()
        expected = (gd @ a_p) * ((gd * gd).sum() / (gd * (gd @ a_p)).sum())
        torch.testing.assert_close(step[p.name] - model.get_parameter(p.name), -0.3 * expected.float(), rtol=1e-3, atol=1e-6)
    # A large μ: the preserved keys' outputs barely move, the edit's still do.
    ed.preserve.spec = dataclasses.replace(ed.preserve.spec, weight=1e4)
    with torch.no_grad():
        strong = ed.apply_edits(batch, reqs).params
    i, name = len(inner) - 1, inner[-1].name
    kp = bank._keys[i][bank.nearest(i, keys[i], excluded).unique()]
    shift, shift0 = strong[name] - model.get_parameter(name), plain_step[name] - model.get_parameter(name)
    assert (kp @ shift.T).norm() < 0.05 * (kp @ shift0.T).norm()
    assert (keys[i] @ shift.T).norm() > 0.2 * (keys[i] @ shift0.T).norm()

    # In training the prompts the outer loss scores are held out of the bank for that step only: the
    # fact nearest the first edit row is preserved, unless its prompt is one the step scores.
    scored = bank.facts[int(bank._fact_of_row[bank.nearest(0, keys[0][:1], excluded)[0]])].prompt
    own = torch.tensor([bank.facts[int(j)].prompt == scored for j in bank._fact_of_row])
    scored_keys = ed.preserve.scaled_keys(0, own.nonzero().squeeze(-1))

    def preserves_scored() -> bool:
        cols = ed.preserve.for_step(ed, keys, batch, reqs)[0]
        return bool((torch.cdist(cols.T, scored_keys) == 0).any())

    seen: list[bool] = []

    def objective(b):
        seen.append(preserves_scored())
        return torch.zeros((), requires_grad=True), {}

    assert preserves_scored()
    outer = types.SimpleNamespace(inscope_prompts=[scored], loc_prompts=["elsewhere"])
    ed.training_loss_and_backward(outer, objective, lambda loss: None)
    assert seen == [False] and ed.preserve._avoid == [] and preserves_scored()

    for bad in ({"rows": "nonpad", "first_order": True}, {"key_whitening": None}):
        with pytest.raises(MetaEditError, match="enn preserve needs rows=target and key_whitening"):
            build_editor("enn", model, cfg, {**hp, **bad, "preserve": spec}, tokenizer=tok, inner_params=inner)
    ed.save_pretrained(str(tmp_path / "ed"))
    loaded = load_editor(tmp_path / "ed", model=model, tokenizer=tok, cache_dir=tmp_path)
    assert loaded.preserve.spec is not None and loaded.preserve.spec.top_k == 3


def test_enn_edit_steps_take_more_inner_steps_at_edit_time_only(make_editor):
    """edit_steps: at edit time (eval mode) the editor takes that many inner steps — the same edit as an
    editor meta-trained for that many — while meta-training (train mode) keeps n_steps."""
    one = make_editor("enn", "tiny-gpt2", edit_lr=0.3, first_order=True)
    two = make_editor("enn", "tiny-gpt2", edit_lr=0.3, first_order=True, n_steps=2)
    both = make_editor("enn", "tiny-gpt2", edit_lr=0.3, first_order=True, edit_steps=2)
    reqs = requests(2)
    batch = one.formatter.batch(*zip(*reqs))
    with torch.no_grad():
        by_one, by_two = one.eval().apply_edits(batch, []).params, two.eval().apply_edits(batch, []).params
        by_both = both.eval().apply_edits(batch, []).params
        trained = both.train().apply_edits(batch, []).params
    for n in by_one:
        assert torch.allclose(by_both[n], by_two[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(trained[n], by_one[n]) and not torch.allclose(by_one[n], by_two[n])
    assert both.hparams()["edit_steps"] == 2
    with pytest.raises(MetaEditError, match="edit_steps >= 1"):
        make_editor("enn", "tiny-gpt2", edit_steps=0)
