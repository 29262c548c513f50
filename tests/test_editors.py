"""Editor behaviour: MEND's gradient capture is exact, edits change predictions, the base is untouched."""

from __future__ import annotations

import pytest
import torch

from metaedit.data.synthetic import build_world
from metaedit.functional import forward_logits
from metaedit.hooks import capture_layer_io
from metaedit.losses import exact_correct, nll

WORLD = build_world(seed=0, n_subjects=200)
TEST_SUBJECTS = [s for s in WORLD.subjects if WORLD.split_of[s] == "test"]


def requests(n: int = 1):
    out = []
    for s in TEST_SUBJECTS[:n]:
        true = WORLD.facts[(s, "capital")]
        new = next(o for o in WORLD.objects["capital"] if o != true)
        out.append((f"The capital of {s} is", new))
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"base tensor {k} changed"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_mend_capture_gives_the_exact_weight_gradient(make_editor, name):
    """Σ_t δ_t u_tᵀ from the captured rows equals autograd's ∇_W L (Conv1D transposed handled)."""
    ed = make_editor("mend", name)
    batch = ed.formatter.batch(*zip(*requests(3)))
    rows = ed.capture(batch)
    params = {p.name: ed.model.get_parameter(p.name).detach().clone().requires_grad_() for p in ed.inner_params}
    loss = nll(forward_logits(ed.model, batch, params), batch.targets, reduction="sum")
    grads = torch.autograd.grad(loss, list(params.values()))
    for p, (u, d), g in zip(ed.inner_params, rows, grads):
        mine = d.T @ u
        mine = mine.T if p.transposed else mine
        assert torch.allclose(mine, g, atol=1e-5, rtol=1e-4), p.name
        assert u.shape[0] > 0 and (u != 0).any(-1).all() and (d != 0).any(-1).all()  # padding rows dropped


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_mend_update_is_w_minus_eta_sum_of_pseudo_outer_products(make_editor, name):
    """apply_edits runs the layers sharing a network as one stack and fuses the update; it must equal
    W' = W − η_ℓ Σ_t δ̃_t ũ_tᵀ with each layer sent through its network alone (its own statistics,
    scale and shift), on non-trivial networks."""
    torch.manual_seed(0)
    ed = make_editor("mend", name)
    batch = ed.formatter.batch(*zip(*requests(3)))
    ed.train()
    ed.transform(ed.capture(batch))  # gives every layer's running norm different statistics
    ed.eval()
    with torch.no_grad():
        for net in ed.nets.values():
            for t in (*net.up, *net.bias, net.scale, net.shift):
                t.add_(torch.randn_like(t) * 0.1)
        ed.edit_lrs.copy_(torch.rand_like(ed.edit_lrs) * 1e-3)
    rows = ed.capture(batch)
    assert len({ed._slot[i][0] for i in range(len(rows))}) < len(rows)  # some layers do share a network
    edited = ed.apply_edits(batch, []).params
    for i, (p, (u, d)) in enumerate(zip(ed.inner_params, rows)):
        key, slot = ed._slot[i]
        u_t, d_t = ed.nets[key](u[None], d[None], [slot])
        step = d_t[0].T @ u_t[0]
        expected = ed.model.get_parameter(p.name) - ed.edit_lrs[i] * (step.T if p.transposed else step)
        assert torch.allclose(edited[p.name], expected, atol=1e-6, rtol=1e-5), p.name
        assert not torch.equal(edited[p.name], ed.model.get_parameter(p.name))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_mend_zero_step_is_a_no_op_and_small_step_descends(make_editor, name):
    ed = make_editor("mend", name)
    batch = ed.formatter.batch(*zip(*requests(2)))
    base = forward_logits(ed.model, batch)
    with torch.no_grad():
        ed.edit_lrs.zero_()
    assert torch.equal(ed.apply_edits(batch, []).logits(batch), base)
    with torch.no_grad():
        ed.edit_lrs.fill_(1e-4)  # identity networks, no statistics yet: a plain gradient step
    edited = ed.apply_edits(batch, []).logits(batch)
    assert nll(edited, batch.targets) < nll(base, batch.targets)  # descent, not the reference's ascent


@pytest.mark.parametrize("method", ["mend", "ft", "ftl"])
def test_edits_never_mutate_the_base(make_editor, method):
    ed = make_editor(method, "tiny-gpt2")
    before = snapshot(ed.model)
    edited = ed.edit(requests(2))
    batch = ed.formatter.batch(*zip(*requests(2)))
    edited.logits(batch)
    edited.generate(input_ids=batch.input_ids[:1, :5], max_new_tokens=2, do_sample=False)
    assert_unchanged(ed.model, before)
    assert any(not torch.equal(v, ed.model.get_parameter(k)) for k, v in edited.params.items())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_ft_edit_changes_the_target_prediction(make_editor, name):
    ed = make_editor("ft", name)
    reqs = requests(1)
    batch = ed.formatter.batch(*zip(*reqs))
    assert not exact_correct(forward_logits(ed.model, batch), batch.targets).any()
    edited = ed.edit(reqs)
    assert exact_correct(edited.logits(batch), batch.targets).all()
    # generate() on the edited model produces the new target greedily
    prompt = ed.formatter.tokenizer(reqs[0][0], return_tensors="pt")
    n = len(ed.formatter.target_ids(reqs[0][1]))
    out = edited.generate(**prompt, max_new_tokens=n, do_sample=False)
    new_tokens = out[0, -n:] if out.shape[1] > n + 1 and name != "tiny-t5" else out[0, 1 : n + 1]
    assert new_tokens.tolist() == ed.formatter.target_ids(reqs[0][1])


def test_ftl_respects_its_linf_bound(make_editor):
    ed = make_editor("ftl", "tiny-gpt2", linf=1e-3, steps=20)
    edited = ed.edit(requests(1))
    for name, w in edited.params.items():
        assert (w - ed.model.get_parameter(name)).abs().max() <= 1e-3 + 1e-7


def test_mend_batches_several_edits(make_editor):
    ed = make_editor("mend", "tiny-llama")
    one = ed.formatter.batch(*zip(*requests(1)))
    three = ed.formatter.batch(*zip(*requests(3)))
    rows1, rows3 = ed.capture(one), ed.capture(three)
    assert all(r3[0].shape[0] > r1[0].shape[0] for r1, r3 in zip(rows1, rows3))
    p1, p3 = ed.apply_edits(one, []).params, ed.apply_edits(three, []).params
    assert all(not torch.equal(p1[k], p3[k]) for k in p1)


def test_edit_refuses_bad_requests(make_editor):
    from metaedit.types import MetaEditError

    ed = make_editor("ft", "tiny-gpt2")
    with pytest.raises(MetaEditError, match="empty 'target'"):
        ed.edit([("The capital of X is", "")])
    with pytest.raises(MetaEditError, match="at least one request"):
        ed.edit([])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_one_stacked_forward_matches_separate_forwards(make_editor, name):
    """The outer loop evaluates rephrases and locality inputs in one forward; padding must not leak."""
    from metaedit.metrics import post_edit_logits

    ed = make_editor("ft", name, steps=3)
    edited = ed.edit(requests(1))
    short = ed.formatter.batch(["People in Kolar speak"], ["Velese"])
    long = ed.formatter.batch(*zip(*requests(3)))
    a, b = post_edit_logits(edited, short, long)
    assert a.shape[:2] == (1, short.width) and b.shape[:2] == (3, long.width)
    assert torch.allclose(a, edited.logits(short), atol=1e-5)
    assert torch.allclose(b, edited.logits(long), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("rows", ["subject", "subject_last"])
def test_mend_subject_rows_are_the_subjects_tokens(make_editor, name, rows):
    """rows=subject/subject_last keep exactly the (u, δ) pairs of the subject's (last) token(s) on the
    prompt stream: the same vectors the full capture has at those positions (a seq2seq decoder keeps
    all of its rows), and a request without a subject uses its last prompt token."""
    from metaedit.locate.tokens import subject_token_span
    from metaedit.types import EditRequest

    full, ed = make_editor("mend", name), make_editor("mend", name, rows=rows)
    pairs = requests(2)
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(pairs)] + [EditRequest("Water is", "hot")]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    assert full.rows == "nonpad"
    picked, everything = ed.capture(batch, reqs), full.capture(batch)
    # The oracle: layer inputs and output gradients at every position, from hooks on the model.
    modules = {p.module_name: ed.model.get_submodule(p.module_name) for p in ed.inner_params}
    with torch.enable_grad(), capture_layer_io(modules) as io:
        loss = nll(forward_logits(ed.model, batch), batch.targets, reduction="sum")
        grads = torch.autograd.grad(loss, [io[p.module_name][1] for p in ed.inner_params])
    want = []
    for r in reqs[:2]:
        first, last = subject_token_span(ed.formatter.tokenizer, r.prompt, r.subject)
        want.append(range(last, last + 1) if rows == "subject_last" else range(first, last + 1))
    want.append([len(ed.formatter.prompt_ids("Water is")) - 1])
    for p, (u, d), (u_all, d_all), g in zip(ed.inner_params, picked, everything, grads):
        if p.side == "output" and batch.decoder_input_ids is not None:
            assert torch.equal(u, u_all) and torch.equal(d, d_all), p.name
            continue
        inputs = io[p.module_name][0]
        expect_u = torch.stack([inputs[i, t] for i, positions in enumerate(want) for t in positions])
        expect_d = torch.stack([g[i, t] for i, positions in enumerate(want) for t in positions])
        # Rows whose δ is exactly zero carry nothing and are dropped in every mode.
        live = (expect_d != 0).any(-1)
        assert live.any(), p.name
        assert torch.allclose(u, expect_u[live].float()) and torch.allclose(d, expect_d[live].float()), p.name


@pytest.mark.parametrize("name, rows", [("tiny-llama", "nonpad"), ("tiny-t5", "subject_last")])
def test_mend_applies_an_edit_in_chunks_with_the_same_update(make_editor, name, rows):
    """MEND's update is a sum over rows, so applying 5 edits 2 at a time (chunk_size=2: three base
    forward/backward passes, each request with its own rows) gives the same edited weights as one
    pass: a batch of 1000 edits fits in memory without changing what it does."""
    from metaedit.types import EditRequest

    # (tiny-llama's inner layers are its last block: no gradient reaches them at the subject.)
    ed = make_editor("mend", name, rows=rows, chunk_size=64, edit_lr=1.0).eval()  # (training mode updates the norms)
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(5))]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    whole = ed.apply_edits(batch, reqs).params
    ed.chunk_size = 2
    assert len(list(ed.chunks(batch, reqs))) == 3
    chunked = ed.apply_edits(batch, reqs).params
    for p in ed.inner_params:
        base = ed.model.get_parameter(p.name)
        scale = float((whole[p.name] - base).abs().max())
        assert scale > 0, p.name
        # The same sums in another order: equal up to float32 rounding of the update's size.
        torch.testing.assert_close(chunked[p.name] - base, whole[p.name] - base, rtol=1e-3, atol=1e-5 * scale)


def test_mend_subject_rows_refuse_requests_that_do_not_match(make_editor):
    from metaedit.types import EditRequest, MetaEditError

    ed = make_editor("mend", "tiny-llama", rows="subject_last")
    req = EditRequest("The capital of France is", "Rome", "Germany")
    batch = ed.formatter.batch([req.prompt], [req.target])
    with pytest.raises(MetaEditError, match="does not occur"):
        ed.capture(batch, [req])
    with pytest.raises(MetaEditError, match="one edit request per row"):
        ed.capture(batch)
    with pytest.raises(MetaEditError, match="rows must be one of"):
        make_editor("mend", "tiny-llama", rows="subjects")


def assert_own_learning_rate(ed, param, lr: float, make_data):
    """Train `ed` two steps at lr 1e-5 / weight decay 0.1; assert `param` had its own optimizer group
    at `lr` without weight decay and every other group the trainer's rate. Returns the trainer."""
    import pytorch_lightning as pl

    from metaedit.system import EditorSystem

    system = EditorSystem(ed, lr=1e-5, weight_decay=0.1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    groups = trainer.optimizers[0].param_groups
    (own,) = [g for g in groups if any(p is param for p in g["params"])]
    assert len(own["params"]) == 1 and own["lr"] == lr and own["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-5 for g in groups if g is not own)
    assert sum(len(g["params"]) for g in groups) == len([p for p in ed.parameters() if p.requires_grad])
    return trainer


def test_mend_step_sizes_get_their_own_learning_rate_and_are_logged(make_editor, make_data):
    """edit_lr_lr (the reference code's lr_lr) puts η in its own optimizer group without weight decay;
    Adam then moves η by about that rate per step; η is logged as train/state/edit_lr_*."""
    ed = make_editor("mend", "tiny-gpt2", edit_lr=1e-3, edit_lr_lr=0.05)
    start = ed.edit_lrs.detach().clone()
    trainer = assert_own_learning_rate(ed, ed.edit_lrs, 0.05, make_data)
    assert (ed.edit_lrs.detach() - start).abs().max() > 0.01
    logged = {k[len("train/state/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/state/")}
    assert logged["edit_lr_max"] == pytest.approx(float(ed.edit_lrs.detach().max()), rel=1e-6)
    assert {f"edit_lr/{p.module_name}" for p in ed.inner_params} < logged.keys()


def test_smollm2_mend_recipe_resolves_on_a_shallow_llama(tiny):
    """The SmolLM2 recipe (configs/tuning/mend_smollm2-135m.yaml) names its blocks by relative depth:
    on SmolLM2's 30 blocks they are 3-7, and the same config builds a working editor on the 4-block
    tiny-llama (one block), reading one (u, δ) row per edit at the subject's last token."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from metaedit.editors.io import build_editor
    from metaedit.models.inner_params import resolve_inner_params
    from metaedit.models.loading import CONFIG_DIR
    from metaedit.types import EditRequest

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["method=mend", "model=smollm2-135m"])
    spec = OmegaConf.to_container(cfg.model.inner_params)
    smol_shape = AutoConfig.for_model("llama", num_hidden_layers=30, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    assert [p.name for p in resolve_inner_params(AutoModelForCausalLM.from_config(smol_shape), spec)] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(3, 8)]
    model, tok, model_cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, spec)
    assert [p.name for p in inner] == ["model.layers.1.mlp.down_proj.weight"]
    hparams = OmegaConf.to_container(cfg.method.editor)
    ed = build_editor("mend", model, model_cfg, hparams, tokenizer=tok, inner_params=inner)
    assert ed.rows == "subject_last"
    reqs = [EditRequest(p, t, s) for (p, t), s in zip(requests(2), TEST_SUBJECTS)]
    rows = ed.capture(ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs]), reqs)
    assert [u.shape[0] for u, _ in rows] == [2]


@pytest.mark.parametrize("method, blocks, c_ns, expect", [
    ("enn", range(24, 30), 0.2, {"first_order": True, "rows": "target", "key_whitening": 0.01, "edit_steps": None}),
    ("ke", range(24, 30), 0.5, {"rows": "target", "init_lr": 0.1, "key_whitening": 0.01}),
    ("ke_constrained", range(24, 30), 0.3, {"rows": "target", "init_lr": 0.1, "margin_init": 0.06, "lambda_init": 3.0}),
])
def test_smollm2_enn_and_ke_recipes_build_working_editors(tiny, tmp_path, method, blocks, c_ns, expect):
    """`python train.py method=enn|ke|ke_constrained` on SmolLM2 composes its tuning file: the down_proj
    of its blocks on SmolLM2's 30 blocks, the file's editor settings reach the editor (the late recipes' statistics
    and preserved facts from the run's own built data), and the editor it builds (untrained, on a tiny
    llama, here with the synthetic data) changes the edited prompt's output without touching the base."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    from metaedit.editors.io import build_editor
    from metaedit.models.inner_params import resolve_inner_params
    from metaedit.models.loading import CONFIG_DIR
    from metaedit.types import EditRequest

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", "model=smollm2-135m", "data=synthetic",
                                          f"paths.data_dir={tmp_path}"])
    spec = OmegaConf.to_container(cfg.model.inner_params)
    smol_shape = AutoConfig.for_model("llama", num_hidden_layers=30, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    assert [p.name for p in resolve_inner_params(AutoModelForCausalLM.from_config(smol_shape), spec)] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in blocks]
    assert cfg.method.optim.schedule == "cosine" and cfg.method.loss.c_ns == c_ns
    model, tok, model_cfg = tiny("tiny-llama")
    data = instantiate(cfg.data, formatter=None, _recursive_=False)
    data.prepare_data()
    hparams = OmegaConf.to_container(cfg.method.editor, resolve=True)
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}]
                                 if 24 in blocks else spec)  # tiny-llama has too few blocks for 24-29
    ed = build_editor(method, model, model_cfg, hparams, tokenizer=tok, inner_params=inner, cache_dir=tmp_path)
    assert {k: ed.hparams()[k] for k in expect} == expect
    if 24 in blocks:  # the late recipes whiten by the run's own training facts and preserve the nearest
        assert hparams["preserve"]["data"] == hparams["stats"]["corpus"] == str(data.data_dir)
        assert ed.preserve.spec is not None and ed.preserve.spec.top_k == 32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reqs = [EditRequest(p, t, s) for (p, t), s in zip(requests(2), TEST_SUBJECTS)]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    edited = ed.edit(reqs)
    with torch.no_grad():
        assert not torch.allclose(edited.logits(batch), forward_logits(model, batch), atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_logits_at_selected_positions_match_the_full_forward(make_editor, name):
    """ROME's value shift reads only target-token logits (the output projection skipped elsewhere):
    they must equal the full forward's, with and without replaced parameters, gradients included."""
    from metaedit.functional import logits_at

    ed = make_editor("ft", name, steps=1)
    batch = ed.formatter.batch(*zip(*requests(3)))
    rows, cols = (batch.targets != -100).nonzero(as_tuple=True)
    full = forward_logits(ed.model, batch)[rows, cols]
    assert torch.allclose(logits_at(ed.model, batch, rows, cols), full, atol=1e-5)
    p = ed.inner_params[0]
    w = ed.model.get_parameter(p.name).detach().clone().requires_grad_(True)
    got = logits_at(ed.model, batch, rows, cols, {p.name: w * 1.5})
    want = forward_logits(ed.model, batch, {p.name: w * 1.5})[rows, cols]
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, full, atol=1e-3)
    (g,) = torch.autograd.grad(got.logsumexp(-1).sum(), w)
    (g_want,) = torch.autograd.grad(want.logsumexp(-1).sum(), w)
    assert torch.allclose(g, g_want, atol=1e-5)


def test_mend_edit_contrast_also_pushes_the_current_answer_down(make_editor):
    """edit_contrast β: the networks read the exact gradient of NLL(target) + β·log P(current answer),
    the latter read where the model's teacher-forced argmax first leaves the target (0 where it never
    does). A step on that gradient widens P(target) over P(current answer) further than a step on NLL
    alone (identity networks: a plain gradient step). β < 0 is refused."""
    from metaedit.losses import rival_logprob
    from metaedit.types import MetaEditError

    ed = make_editor("mend", "tiny-gpt2")
    batch = ed.formatter.batch(*zip(*requests(3)))
    base = forward_logits(ed.model, batch)
    valid = batch.targets != -100
    argmax = base.argmax(-1)
    # tiny-gpt2's city names share a first token: the answers part at a later position.
    at = (valid & (argmax != batch.targets)).float().argmax(-1)
    rows_idx = torch.arange(len(batch))
    assert (at > valid.float().argmax(-1)).any()
    rival = argmax[rows_idx, at]
    logp = torch.log_softmax(base[rows_idx, at], -1)
    assert torch.allclose(rival_logprob(base, batch.targets), logp[rows_idx, rival])
    own = torch.where(valid, argmax, batch.targets)  # greedy decoding already gives it: nothing to push down
    assert torch.equal(rival_logprob(base, own), torch.zeros(len(batch)))

    ed.edit_contrast = 1.0
    rows = ed.capture(batch)
    params = {p.name: ed.model.get_parameter(p.name).detach().clone().requires_grad_() for p in ed.inner_params}
    logits = forward_logits(ed.model, batch, params)
    loss = nll(logits, batch.targets, reduction="sum") + rival_logprob(logits, batch.targets).sum()
    for p, (u, d), g in zip(ed.inner_params, rows, torch.autograd.grad(loss, list(params.values()))):
        mine = d.T @ u
        assert torch.allclose(mine.T if p.transposed else mine, g, atol=1e-5, rtol=1e-4), p.name

    # The trained tiny model is near-certain of its capitals (P ≈ 0.99: log P saturates and its
    # gradient vanishes), so the behaviour is shown on prompts it is unsure of: the bare subject.
    ed.eval()  # no running statistics: identity networks, a plain gradient step
    unsure = ed.formatter.batch([TEST_SUBJECTS[i] for i in range(3)], [t for _, t in requests(3)])
    logits = forward_logits(ed.model, unsure)
    at = ((unsure.targets != -100) & (logits.argmax(-1) != unsure.targets)).float().argmax(-1)
    rival = logits.argmax(-1)[rows_idx, at]

    def gap(beta: float) -> torch.Tensor:
        ed.edit_contrast = beta
        post = torch.log_softmax(ed.apply_edits(unsure, []).logits(unsure)[rows_idx, at], -1)
        return post.gather(-1, unsure.targets[rows_idx, at, None]).squeeze(-1) - post[rows_idx, rival]

    with torch.no_grad():
        # 1e-2, not 1e-3: the tiny model is trained on each machine, and on one the smaller step moved the
        # gap by only 5e-4 for one prompt (this step: 5e-3 to 2e-2 there).
        ed.edit_lrs.fill_(1e-2)
    assert (gap(1.0) > gap(0.0) + 1e-3).all()
    with pytest.raises(MetaEditError, match="edit_contrast must be >= 0"):
        make_editor("mend", "tiny-gpt2", edit_contrast=-1.0)


@pytest.mark.parametrize("transform_delta", [True, False])
def test_mend_transform_delta_false_learns_only_the_key(make_editor, transform_delta):
    """transform_delta=False: δ̃ is the normalised gradient δ whatever the networks' weights, while ũ
    is still learned (and reads δ); True transforms both. The choice is saved with the editor."""
    from metaedit.editors.mend.networks import stacked_moments

    torch.manual_seed(0)
    ed = make_editor("mend", "tiny-gpt2", transform_delta=transform_delta)
    batch = ed.formatter.batch(*zip(*requests(3)))
    ed.train()
    rows = ed.capture(batch)
    ed.transform(rows)  # running statistics
    ed.eval()
    with torch.no_grad():
        for net in ed.nets.values():
            for t in (*net.up, *net.bias, net.scale, net.shift):
                t.add_(torch.randn_like(t) * 0.1)
    for i, ((u, d), (u_t, d_t)) in enumerate(zip(rows, ed.transform(rows))):
        key, slot = ed._slot[i]
        net = ed.nets[key]
        mean, std = stacked_moments([net.norms[slot]], u.dtype)
        h = (torch.cat([u, d], -1) - mean) / std
        assert not torch.allclose(u_t, h[:, : net.d_in], atol=1e-4)
        assert torch.allclose(d_t, h[:, net.d_in :], atol=1e-6) is not transform_delta
    assert ed.hparams()["transform_delta"] is transform_delta


def test_mend_key_whitening_applies_the_rome_direction_and_spares_common_keys(tiny, tmp_path):
    """key_whitening: each applied key is A ũ scaled so its dot product with ũ is kept (A = (C + ρI)⁻¹
    from the key statistics), so the update along the edit's own key is the plain one's while a key
    in C's dominant direction (what every text's keys share) moves far less; the edit still descends."""
    from metaedit.editors.io import build_editor
    from metaedit.locate.solve import regularised
    from metaedit.locate.stats import StatsSpec, second_moments
    from metaedit.models.inner_params import resolve_inner_params

    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    stats = {"n_tokens": 3000, "seq_len": 64}
    plain = build_editor("mend", model, cfg, {"edit_lr": 1e-3}, tokenizer=tok, inner_params=inner)
    white = build_editor("mend", model, cfg, {"edit_lr": 1e-3, "key_whitening": 1e-2, "stats": stats},
                         tokenizer=tok, inner_params=inner, cache_dir=tmp_path)
    white.load_state_dict(plain.state_dict())
    white.prepare()
    assert list((tmp_path / "stats").glob("*.safetensors"))  # computed once, cached
    batch = plain.formatter.batch(*zip(*requests(2)))
    rows = plain.transform(plain.capture(batch))
    by_plain, by_white = plain.apply_edits(batch, []).params, white.apply_edits(batch, []).params
    layers = [int(p.module_name.split(".")[2]) for p in inner]
    moments = second_moments(model, tok, sorted(set(layers)), StatsSpec(**stats), tmp_path)
    for p, ell, (u, _) in zip(inner, layers, rows):
        a = torch.linalg.inv(regularised(moments[ell], 1e-2)).float()
        w = white.whiten(inner.index(p), u)
        expected = (u @ a) * ((u * u).sum(-1) / (u * (u @ a)).sum(-1))[:, None]
        assert torch.allclose(w, expected, rtol=1e-4, atol=1e-6)
        assert torch.allclose((w * u).sum(-1), (u * u).sum(-1), rtol=1e-4)  # the edit's own key: same effect
        top = torch.linalg.eigh(moments[ell].double()).eigenvectors[:, -1].float()  # the keys' common direction
        d_plain = (by_plain[p.name] - model.get_parameter(p.name)) @ top
        d_white = (by_white[p.name] - model.get_parameter(p.name)) @ top
        assert d_white.norm() < 0.5 * d_plain.norm(), p.name
        # Under bf16 autocast (trainer.precision=bf16-mixed) and for bf16 rows, the product with A is
        # still a float32 one: A's entries cancel, and a bf16 product loses the small directions.
        u16 = u.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w16 = white.whiten(inner.index(p), u16)
        u16 = u16.float()
        expected = (u16 @ a) * ((u16 * u16).sum(-1) / (u16 * (u16 @ a)).sum(-1))[:, None]
        assert w16.dtype == torch.float32 and torch.allclose(w16, expected, rtol=1e-4, atol=1e-6)
    before = nll(forward_logits(model, batch), batch.targets)
    assert nll(white.apply_edits(batch, []).logits(batch), batch.targets) < before


@pytest.mark.parametrize("method", ["enn", "ke"])
def test_enn_and_ke_key_whitening_step_along_the_whitened_gradient_and_spare_common_keys(tiny, tmp_path, method):
    """ENN's step and KE's conditioner input with key_whitening are G A · ⟨G, G⟩/⟨G, G A⟩ for the edit's
    gradient G (A = (C + ρI)⁻¹ from the key statistics): the same first-order descent along G, far
    less movement along the keys' dominant direction; the whitened edit still lowers the edit loss."""
    from metaedit.editors.io import build_editor
    from metaedit.editors.rows import per_edit_gradients
    from metaedit.locate.solve import regularised
    from metaedit.locate.stats import StatsSpec, second_moments
    from metaedit.models.inner_params import resolve_inner_params
    from metaedit.types import EditRequest

    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    stats = {"n_tokens": 3000, "seq_len": 64}
    step = {"enn": {"edit_lr": 0.3, "first_order": True}, "ke": {"init_lr": 0.3}}[method]
    plain = build_editor(method, model, cfg, step, tokenizer=tok, inner_params=inner)
    white = build_editor(method, model, cfg, {**step, "key_whitening": 1e-2, "stats": stats}, tokenizer=tok,
                         inner_params=inner, cache_dir=tmp_path)
    white.load_state_dict(plain.state_dict())
    white.prepare()
    assert white.hparams()["key_whitening"] == 1e-2 and plain.hparams()["key_whitening"] is None
    reqs = [EditRequest(prompt=p, target=t) for p, t in requests(2)]
    batch = plain.formatter.batch(*zip(*requests(2)))
    grads = per_edit_gradients(model, inner, batch, summed=method == "enn")
    by_plain, by_white = plain.apply_edits(batch, reqs).params, white.apply_edits(batch, reqs).params
    layers = [int(p.module_name.split(".")[2]) for p in inner]
    moments = second_moments(model, tok, sorted(set(layers)), StatsSpec(**stats), tmp_path)
    for i, (p, ell, g) in enumerate(zip(inner, layers, grads)):
        a = torch.linalg.inv(regularised(moments[ell], 1e-2)).float()
        if method == "enn":  # the step itself: −α G_w
            expected = (g @ a) * ((g * g).sum() / (g * (g @ a)).sum())
            w = white.whitening.gradient(white, i, g)
            assert torch.allclose(w, expected, rtol=1e-4, atol=1e-7)
            assert torch.allclose((w * g).sum(), (g * g).sum(), rtol=1e-4)  # the same first-order descent
            assert torch.allclose(by_white[p.name] - model.get_parameter(p.name), -0.3 * w, rtol=1e-4, atol=1e-7)
        else:  # KE's conditioner reads each edit's whitened gradient
            w = white.per_edit_gradients(batch, reqs)[i]
            scale = (g * g).sum((-2, -1), keepdim=True) / (g * (g @ a)).sum((-2, -1), keepdim=True)
            assert torch.allclose(w, (g @ a) * scale, rtol=1e-4, atol=1e-7)
        top = torch.linalg.eigh(moments[ell].double()).eigenvectors[:, -1].float()  # the keys' common direction
        d_plain = (by_plain[p.name] - model.get_parameter(p.name)) @ top
        d_white = (by_white[p.name] - model.get_parameter(p.name)) @ top
        assert d_white.norm() < 0.5 * d_plain.norm(), p.name
        # Under bf16 autocast and for a bf16 gradient, the product with A is a float32 one (as MEND's rows).
        g16 = g.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            w16 = white.whitening.gradient(white, i, g16)
        g16 = g16.float()
        expected = (g16 @ a) * ((g16 * g16).sum((-2, -1), keepdim=True) / (g16 * (g16 @ a)).sum((-2, -1), keepdim=True))
        assert w16.dtype == torch.float32 and torch.allclose(w16, expected, rtol=1e-4, atol=1e-7)
    before = nll(forward_logits(model, batch), batch.targets)
    assert nll(white.apply_edits(batch, reqs).logits(batch), batch.targets) < before


@pytest.mark.parametrize("method", ["mend", "enn", "ke"])
def test_mend_key_whitening_refuses_a_layer_without_key_statistics_and_a_bad_ridge(make_editor, method):
    from metaedit.types import MetaEditError

    with pytest.raises(MetaEditError, match=r"key_whitening needs every inner parameter to be an MLP output projection"):
        make_editor(method, "tiny-llama", key_whitening=1e-2)  # the default inner params include gate/up_proj
    with pytest.raises(MetaEditError, match="key_whitening must be > 0"):
        make_editor(method, "tiny-llama", key_whitening=0.0)
