"""KE: per-edit gradients are exact, batched edits are the sum of single edits, the constrained
objective's multiplier and margin behave as a Lagrangian should, and checkpoints round-trip."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from metaedit import load_editor
from metaedit.decoding import greedy_relabel
from metaedit.editors.io import WEIGHTS
from metaedit.functional import forward_logits
from metaedit.hooks import capture_layer_io
from metaedit.locate.tokens import subject_token_span
from metaedit.losses import nll
from metaedit.system import EditorSystem
from metaedit.types import EditRequest, MetaEditError
from tests.test_editors import TEST_SUBJECTS, WORLD, assert_unchanged, requests, snapshot


def reqs(n: int) -> list[EditRequest]:
    return [EditRequest(*r) for r in requests(n)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_ke_per_edit_gradients_are_each_edits_own_gradient(make_editor, name):
    ed = make_editor("ke", name)
    batch = ed.formatter.batch(*zip(*requests(3)))
    grads = ed.per_edit_gradients(batch)
    for i in range(3):
        one = ed.formatter.batch(*zip(*requests(3)[i : i + 1]))
        params = {p.name: ed.model.get_parameter(p.name).detach().clone().requires_grad_() for p in ed.inner_params}
        loss = nll(forward_logits(ed.model, one, params), one.targets, reduction="sum")
        for p, g, ref in zip(ed.inner_params, grads, torch.autograd.grad(loss, list(params.values()))):
            ref = ref.T if p.transposed else ref  # per-edit gradients are [d_out, d_in]
            # (padding in the batched pass changes float summation order only)
            assert (g[i] - ref).norm() <= 1e-4 * ref.norm(), (p.name, i)



@pytest.mark.parametrize("rows", ["subject", "subject_last"])
def test_ke_subject_rows_sum_only_the_subjects_positions(make_editor, rows):
    """rows=subject(_last): edit i's ∇W is Σ_t δ_t u_tᵀ over its subject's (last) token(s) on the
    encoder stream (T5's encoder layers), every position on the decoder's (it reads only the target)."""
    full, ed = make_editor("ke", "tiny-t5"), make_editor("ke", "tiny-t5", rows=rows)
    r = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    batch = ed.formatter.batch([x.prompt for x in r], [x.target for x in r])
    picked, everything = ed.per_edit_gradients(batch, r), full.per_edit_gradients(batch)
    modules = {p.module_name: ed.model.get_submodule(p.module_name) for p in ed.inner_params}
    with torch.enable_grad(), capture_layer_io(modules) as io:
        loss = nll(forward_logits(ed.model, batch), batch.targets, reduction="sum")
        deltas = torch.autograd.grad(loss, [io[p.module_name][1] for p in ed.inner_params])
    encoder_layers = 0
    for p, g, g_all, d in zip(ed.inner_params, picked, everything, deltas):
        if p.side == "output":
            assert torch.equal(g, g_all), p.name
            continue
        encoder_layers += 1
        u = io[p.module_name][0]
        for i, x in enumerate(r):
            first, last = subject_token_span(ed.formatter.tokenizer, x.prompt, x.subject)
            ts = [last] if rows == "subject_last" else range(first, last + 1)
            want = sum(torch.outer(d[i, t].float(), u[i, t].float()) for t in ts)
            assert want.norm() > 0 and (g[i] - want).norm() <= 1e-5 * want.norm(), (p.name, i)
            assert (g_all[i] - want).norm() > 1e-3 * want.norm(), (p.name, i)  # other positions really count
    assert encoder_layers > 0
    with pytest.raises(MetaEditError, match="rows must be one of"):
        make_editor("ke", "tiny-t5", rows="answers")
    with pytest.raises(MetaEditError, match="causal LMs"):
        make_editor("ke", "tiny-t5", rows="target")
    with pytest.raises(MetaEditError, match="causal LMs"):
        make_editor("ke", "tiny-t5", rows="answer")
    with pytest.raises(MetaEditError, match="one edit request per edit"):
        ed.per_edit_gradients(batch)

def test_ke_batch_of_edits_is_the_sum_of_single_edits_and_leaves_the_base(make_editor):
    ed = make_editor("ke", "tiny-gpt2")
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial editor: conditions really differ between edits
        for p in ed.conditioners.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    before = snapshot(ed.model)
    r = reqs(3)
    together = ed.edit(r).params
    singles = [ed.edit([x]).params for x in r]
    for name, w in together.items():
        base = ed.model.get_parameter(name)
        summed = base + sum(s[name] - base for s in singles)
        assert torch.allclose(w, summed, atol=1e-6), name
        assert not torch.equal(w, base)
    assert_unchanged(ed.model, before)
    # The conditioning text uses the base's current (greedy) answer, as long as the new target.
    old = ed.old_answers(ed.formatter.batch(*zip(*requests(1))), r[:1])
    assert old[0] and old[0] != r[0].target


def test_ke_needs_the_text_of_every_edit(make_editor):
    ed = make_editor("ke", "tiny-gpt2")
    batch = ed.formatter.batch(*zip(*requests(2)))
    with pytest.raises(MetaEditError, match="needs the text of every edit: 2 edits in the batch, 0 requests"):
        ed.apply_edits(batch, [])
    with pytest.raises(MetaEditError, match="objective must be one of"):
        make_editor("ke", "tiny-gpt2", objective="lagrange")



def test_ke_conditions_each_sequential_edit_on_the_model_as_edited_so_far(make_editor, monkeypatch):
    """Two sequential edits of one prompt: the second's "{current prediction} >> ..." must be the
    answer of the model after the first edit, not the unedited base's answer cached for that prompt."""
    ed = make_editor("ke", "tiny-gpt2", init_lr=3.0)  # untrained KE: a plain descent step of size 3
    before = snapshot(ed.model)
    first = reqs(1)[0]
    n_tokens = len(ed.formatter.target_ids(first.target))
    other = next(o for o in WORLD.objects["capital"]
                 if o != first.target and len(ed.formatter.target_ids(o)) == n_tokens)
    second = EditRequest(first.prompt, other)  # same prompt and answer length: the same cache key
    batch = ed.formatter.batch([first.prompt], [first.target])
    base_answer = ed.old_answers(batch, [first])[0]

    def greedy_answer(model) -> str:
        row = greedy_relabel(model.logits, batch).targets[0]
        return ed.formatter.tokenizer.decode(row[row != -100].tolist()).strip()

    conditioned_on: list[str] = []
    real_old_answers = ed.old_answers

    def recorded_old_answers(edit, requests_):
        answers = real_old_answers(edit, requests_)
        conditioned_on.extend(answers)
        return answers

    monkeypatch.setattr(ed, "old_answers", recorded_old_answers)
    after_first: list[str] = []
    ed.edit_sequential([first, second], after_each=lambda k, m: after_first.append(greedy_answer(m)))
    assert after_first[0] != base_answer  # the first edit changed the answer, so a stale cache would show
    assert conditioned_on == [base_answer, after_first[0]]
    assert real_old_answers(batch, [first]) == [base_answer]  # back on the unedited base
    assert_unchanged(ed.model, before)


def test_ke_constrained_lambda_rises_above_the_margin_and_falls_to_zero_below(make_editor):
    ed = make_editor("ke_constrained", "tiny-gpt2", lambda_init=1.0, lambda_lr=0.5, margin_init=0.1)
    ed.train()
    l_edit = torch.tensor(2.0, requires_grad=True)
    l_loc = torch.tensor(0.3, requires_grad=True)  # KL 0.3 > margin 0.1: the constraint is violated
    lambdas = [ed.lagrange.item()]
    for _ in range(4):
        loss = ed.outer_objective(l_edit, l_loc, 1.0, 1.0, edit_success=torch.tensor(0.0))
        lambdas.append(ed.lagrange.item())
    assert lambdas == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4])  # λ ← λ + lr·(KL − m)
    # The editor's loss is the Lagrangian at the λ used: ∂loss/∂KL = λ (before this step's update).
    (g_loc,) = torch.autograd.grad(loss, l_loc)
    assert g_loc.item() == pytest.approx(1.3)
    below = torch.tensor(0.02)  # KL 0.02 < margin 0.1: λ shrinks by 0.04 a step, then stays at 0
    for _ in range(40):
        ed.outer_objective(l_edit, below, 1.0, 1.0, edit_success=torch.tensor(0.0))
    assert ed.lagrange.item() == 0.0
    ed.outer_objective(l_edit, torch.tensor(0.15), 1.0, 1.0, edit_success=torch.tensor(0.0))
    assert ed.lagrange.item() == pytest.approx(0.025)  # projected, not stuck: rises again when violated
    # Not in training (validation, evaluation): no update.
    ed.eval()
    ed.outer_objective(l_edit, l_loc, 1.0, 1.0)
    assert ed.lagrange.item() == pytest.approx(0.025)


def test_ke_constrained_margin_anneals_when_edits_succeed(make_editor):
    ed = make_editor("ke_constrained", "tiny-gpt2", margin_init=1e-2, margin_min=5e-3, success_decay=0.5)
    ed.train()
    margins = []
    for _ in range(20):
        ed.outer_objective(torch.tensor(1.0), torch.tensor(0.0), 1.0, 1.0, edit_success=torch.tensor(1.0))
        margins.append(ed.margin.item())
    # running success 0.5, 0.75, 0.875, 0.9375 > 0.9 -> ×0.8 (the average restarts): 8e-3, 6.4e-3, 5.12e-3, floor 5e-3
    assert margins[:4] == pytest.approx([1e-2, 1e-2, 1e-2, 8e-3])
    assert margins[-1] == pytest.approx(5e-3) and min(margins) >= 5e-3 - 1e-9  # float32 buffer
    low = make_editor("ke_constrained", "tiny-gpt2")
    low.train()
    for _ in range(20):
        low.outer_objective(torch.tensor(1.0), torch.tensor(0.0), 1.0, 1.0, edit_success=torch.tensor(0.5))
    assert low.margin.item() == pytest.approx(low.margin_init)


def test_ke_constrained_state_survives_training_steps_and_checkpoints(make_editor, make_data, tiny, tmp_path):
    ed = make_editor("ke_constrained", "tiny-gpt2", lambda_lr=10.0)
    base = snapshot(ed.model)
    system = EditorSystem(ed, lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    assert ed.lagrange.item() != ed.lambda_init  # the training step ran the dual ascent
    assert_unchanged(ed.model, base)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state["editor.lagrange"], ed.lagrange) and torch.equal(state["editor.margin"], ed.margin)

    with torch.no_grad():
        ed.margin.fill_(3e-3)
    ed.save_pretrained(str(tmp_path / "ed"))
    model, _, _ = tiny("tiny-gpt2")
    loaded = load_editor(tmp_path / "ed", model=model)
    assert loaded.method == "ke_constrained" and loaded.objective == "constrained"
    for k, v in ed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    a, b = ed.edit(reqs(2)).params, loaded.edit(reqs(2)).params
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(str(tmp_path / "ed" / WEIGHTS))
    base_sd = dict(model.state_dict())
    assert not set(saved) & set(base_sd) and {"lagrange", "margin", "success_ema"} <= set(saved)
    for t in saved.values():  # the embedding copy was trained: no tensor equals a base tensor
        assert not any(t.shape == w.shape and torch.equal(t, w) for w in base_sd.values())


def test_ke_embedding_copy_has_its_own_learning_rate_and_constrained_state_is_logged(make_editor, make_data):
    ed = make_editor("ke_constrained", "tiny-gpt2", embed_lr=1e-6)
    embed = ed.encoder.embed.weight
    embed_before = embed.detach().clone()
    system = EditorSystem(ed, lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))

    groups = trainer.optimizers[0].param_groups  # built by EditorSystem.configure_optimizers
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in ed.parameters() if p.requires_grad) and len(ids) == len(set(ids))
    (emb,) = [g for g in groups if any(p is embed for p in g["params"])]
    assert len(emb["params"]) == 1 and emb["lr"] == 1e-6
    assert all(g["lr"] == 1e-3 for g in groups if g is not emb)
    # Adam moves each entry by about its group's lr per step: 2 steps at 1e-6 stay far below 1e-3.
    moved = (embed.detach() - embed_before).abs().max().item()
    assert 0 < moved < 1e-5

    logged = {k[len("train/state/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/state/")}
    assert logged == pytest.approx({"lambda": ed.lagrange.item(), "margin": ed.margin.item(),
                                    "success_ema": ed.success_ema.item()})
    assert logged["lambda"] != ed.lambda_init  # the values after the steps' dual ascent, not the initial ones
    assert make_editor("ke", "tiny-gpt2").state_to_log() == {}  # shared objective: λ and m take no part


def test_ke_preserve_feeds_the_conditioner_each_edits_gradient_along_the_preserved_whitening(tiny, tmp_path):
    """preserve (as ENN's): each edit's ∇W_i enters the conditioner as ∇W_i A_P · ⟨∇W_i, ∇W_i⟩/⟨∇W_i, ∇W_i A_P⟩,
    A_P = (C_ρ + μ K_PᵀK_P)⁻¹ with K_P the training facts' keys nearest the batch's answer-position keys,
    never a fact about an edited subject, nor in training one whose prompt the outer loss scores; the
    untrained editor's step then spares the preserved keys' outputs at a large μ; bad settings are
    refused; the setting round-trips."""
    import dataclasses
    import types

    from metaedit.editors.io import build_editor
    from metaedit.editors.rows import per_edit_gradients
    from metaedit.locate.solve import regularised
    from tests.test_enn import preserve_world

    w = preserve_world(tiny, tmp_path)
    hp = {"init_lr": 0.3, "rows": "target", "key_whitening": 1e-2, "stats": w.stats}
    ed = build_editor("ke", w.model, w.cfg, {**hp, "preserve": w.spec}, tokenizer=w.tok, inner_params=w.inner,
                      cache_dir=tmp_path)
    ed.prepare()
    batch = ed.formatter.batch([r.prompt for r in w.reqs], [r.target for r in w.reqs])
    keys: list[torch.Tensor] = []
    raw = per_edit_gradients(w.model, w.inner, batch, "target", ed.formatter, w.reqs, keys=keys)
    bank = ed.preserve
    excluded = bank.excluded_rows([r.subject for r in w.reqs], batch.prompts)
    fed = ed.per_edit_gradients(batch, w.reqs)
    for i, (ell, g, got) in enumerate(zip(w.layers, raw, fed)):
        rows = bank.nearest(i, keys[i], excluded).unique()
        assert len(rows) and not any(TEST_SUBJECTS[0] in bank.facts[int(j)].prompt for j in bank._fact_of_row[rows])
        kp = bank._keys[i][rows].double()
        a_p = torch.linalg.inv(regularised(w.moments[ell], 1e-2) + kp.T @ kp)
        gd = g.double()  # [n_edits, d_out, d_in]: one scale per edit
        expected = (gd @ a_p) * ((gd * gd).sum((-2, -1), keepdim=True) / (gd * (gd @ a_p)).sum((-2, -1), keepdim=True))
        # float32 solve against a float64 inverse: compared as whole matrices
        assert (got.double() - expected).norm() <= 1e-4 * expected.norm(), i

    # A large μ: the untrained editor's update barely moves the preserved keys' outputs, still the edits'.
    plain = build_editor("ke", w.model, w.cfg, hp, tokenizer=w.tok, inner_params=w.inner, cache_dir=tmp_path)
    plain.load_state_dict(ed.state_dict())  # the same conditioner: the two differ only by preserve
    ed.preserve.spec = dataclasses.replace(ed.preserve.spec, weight=1e4)
    with torch.no_grad():
        strong, base = ed.apply_edits(batch, w.reqs).params, plain.apply_edits(batch, w.reqs).params
    i, name = len(w.inner) - 1, w.inner[-1].name
    kp = bank._keys[i][bank.nearest(i, keys[i], excluded).unique()]
    shift, shift0 = strong[name] - w.model.get_parameter(name), base[name] - w.model.get_parameter(name)
    assert (kp @ shift.T).norm() < 0.1 * (kp @ shift0.T).norm()
    assert (keys[i] @ shift.T).norm() > 0.2 * (keys[i] @ shift0.T).norm()

    # In training, a prompt the outer loss scores is out of the bank for that step only.
    scored = bank.facts[int(bank._fact_of_row[bank.nearest(0, keys[0][:1], excluded)[0]])].prompt
    own = torch.tensor([bank.facts[int(j)].prompt == scored for j in bank._fact_of_row])
    scored_keys = bank.scaled_keys(0, own.nonzero().squeeze(-1))

    def preserves_scored() -> bool:
        return bool((torch.cdist(bank.for_step(ed, keys, batch, w.reqs)[0].T, scored_keys) == 0).any())

    seen: list[bool] = []

    def objective(b):
        seen.append(preserves_scored())
        return torch.zeros((), requires_grad=True), {}

    assert preserves_scored()
    ed.training_loss_and_backward(types.SimpleNamespace(inscope_prompts=[scored], loc_prompts=[]), objective,
                                  lambda loss: None)
    assert seen == [False] and preserves_scored()

    for bad in ({"rows": "nonpad"}, {"key_whitening": None}):
        with pytest.raises(MetaEditError, match="ke preserve needs rows=target and key_whitening"):
            build_editor("ke", w.model, w.cfg, {**hp, **bad, "preserve": w.spec}, tokenizer=w.tok, inner_params=w.inner)
    ed.save_pretrained(str(tmp_path / "ed"))
    loaded = load_editor(tmp_path / "ed", model=w.model, tokenizer=w.tok, cache_dir=tmp_path)
    assert loaded.preserve.spec is not None and loaded.preserve.spec.weight == 1e4
