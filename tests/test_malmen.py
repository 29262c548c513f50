"""MALMEN: the least-squares shift, its chunked accumulation, the decoupled training gradient, train.py."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from metaedit.editors.io import build_editor, load_editor, save_editor
from metaedit.editors.malmen import solve_shift
from metaedit.editors.malmen.editor import normal_terms, solve_in_span, solve_joint
from metaedit.functional import forward_logits
from metaedit.losses import exact_correct, mean_target_logprob, nll
from metaedit.models.inner_params import resolve_inner_params
from metaedit.system import EditorSystem
from metaedit.types import MetaEditError
from tests.conftest import run_cli
from tests.test_cli import FAST
from tests.test_editors import requests


def test_solve_is_the_closed_form_and_tends_to_the_summed_update():
    g = torch.Generator().manual_seed(0)
    k, d = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.3, dtype=torch.float64)
    expected = d.T @ k @ torch.linalg.inv(k.T @ k + lam.exp() * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(solve_shift(k.T @ k, d.T @ k, lam), expected)
    # (KᵀK + e^λ I)⁻¹ → e^{-λ} I: e^λ ΔW → DᵀK, the summed update Σ_t d_t k_tᵀ.
    big = torch.tensor(25.0, dtype=torch.float64)
    torch.testing.assert_close(big.exp() * solve_shift(k.T @ k, d.T @ k, big), d.T @ k, atol=1e-6, rtol=1e-6)


def test_solve_with_a_ridge_matrix_is_the_closed_form_and_tends_to_the_whitened_summed_update():
    g = torch.Generator().manual_seed(1)
    k, d = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    r = m @ m.T + 0.5 * torch.eye(4, dtype=torch.float64)  # symmetric positive definite
    lam = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(solve_shift(k.T @ k, d.T @ k, lam, r), d.T @ k @ torch.linalg.inv(k.T @ k + lam.exp() * r))
    big = torch.tensor(25.0, dtype=torch.float64)  # e^λ ΔW → Dᵀ K R⁻¹
    torch.testing.assert_close(big.exp() * solve_shift(k.T @ k, d.T @ k, big, r), d.T @ k @ torch.linalg.inv(r),
                               atol=1e-6, rtol=1e-6)


def test_joint_solve_is_the_stacked_closed_form_and_one_layer_is_the_per_layer_solve():
    """min ‖Σ_ℓ K_ℓ ΔW_ℓᵀ − V‖² + Σ_ℓ e^{λ_ℓ} tr(ΔW_ℓ R_ℓ ΔW_ℓᵀ) solved in its primal form over the
    layers' keys side by side ([K_1 … K_L], block-diagonal ridge) against solve_joint's rows × rows form."""
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    keys = [torch.randn(9, d, generator=g, dtype=f64) for d in (4, 5, 3)]
    values = torch.randn(9, 2, generator=g, dtype=f64)
    lams = torch.tensor([0.3, -0.5, 1.0], dtype=f64)
    m = torch.randn(5, 5, generator=g, dtype=f64)
    ridges = [None, m @ m.T + 0.5 * torch.eye(5, dtype=f64), None]
    stacked = torch.cat(keys, dim=1)
    blocks = [lam.exp() * (torch.eye(k.shape[1], dtype=f64) if r is None else r) for k, lam, r in zip(keys, lams, ridges)]
    primal = torch.linalg.solve(stacked.T @ stacked + torch.block_diag(*blocks), stacked.T @ values)  # [Σ d_in, d_out]
    got = solve_joint(keys, values, lams, ridges)
    torch.testing.assert_close(torch.cat([s.T for s in got]), primal)
    # One layer: the per-layer solve of the same rows.
    k, lam = keys[0], lams[:1]
    torch.testing.assert_close(solve_joint([k], values, lam)[0], solve_shift(k.T @ k, values.T @ k, lam[0]))


def test_span_solve_is_the_closed_form_within_the_span_and_one_edit_gets_mends_step():
    """solve_in_span: the least-squares shift over ΔWᵀ = Bᵀ A (rows in the span of the pseudo keys B),
    fitted at the real keys K; with a basis spanning every dimension it is solve_shift; for one edit at a
    small λ it is MEND's rank-1 step d ũᵀ / (u·ũ), whose change at u is d."""
    g, f64 = torch.Generator().manual_seed(3), torch.float64
    k, d = torch.randn(5, 8, generator=g, dtype=f64), torch.randn(5, 3, generator=g, dtype=f64)
    b = torch.randn(5, 8, generator=g, dtype=f64)
    m = torch.randn(8, 8, generator=g, dtype=f64)
    r = m @ m.T + 0.5 * torch.eye(8, dtype=f64)
    lam = torch.tensor(0.3, dtype=f64)
    gram, cross = normal_terms(k, d)
    # min_A ‖K Bᵀ A − D‖² + e^λ tr(Aᵀ B R Bᵀ A), directly from its normal equations in A.
    kb = k @ b.T
    a = torch.linalg.solve(kb.T @ kb + lam.exp() * b @ r @ b.T, kb.T @ d)
    torch.testing.assert_close(solve_in_span(gram, cross, lam, b, r), (b.T @ a).T)
    full = torch.randn(11, 8, generator=g, dtype=f64)
    torch.testing.assert_close(solve_in_span(gram, cross, lam, full, r), solve_shift(gram, cross, lam, r))
    u, u_t, d1 = k[:1], b[:1], d[:1]
    one = solve_in_span(*normal_terms(u, d1), torch.tensor(-30.0, dtype=f64), u_t)
    torch.testing.assert_close(one, d1.T @ u_t / (u * u_t).sum())
    torch.testing.assert_close(u @ one.T, d1)


def test_span_solve_writes_only_the_pseudo_keys_directions(tiny):
    """solve=pseudo_span in the editor: every ΔW_ℓ's rows lie in the span of that layer's pseudo keys ũ
    (per_layer's lie in the real keys' span), and at a small λ the edits' keys still get their value
    shifts (float64: a copy of the base, the editor converted)."""
    from metaedit.types import EditRequest

    model, tok, cfg = tiny("tiny-llama")
    ed = build_editor("malmen", copy.deepcopy(model).double(), cfg, {"rows": "answer", "solve": "pseudo_span"},
                      tokenizer=tok).double()
    reqs = [EditRequest(p, t) for p, t in requests(3)]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)  # networks away from their identity start: ũ ≠ u
    with torch.no_grad():
        ed.log_lambdas.fill_(-20.0)
        shifts = ed.weight_shifts(batch, reqs)
        (kd, _, tilde), = list(ed.key_value_rows(batch, reqs))
        ed.solve = "per_layer"
        plain = ed.weight_shifts(batch, reqs)
    for shift, other, (k, d), u_t in zip(shifts, plain, kd, tilde):
        q, _ = torch.linalg.qr(u_t.T)
        assert (shift - shift @ q @ q.T).norm() < 1e-8 * shift.norm()
        assert (other - other @ q @ q.T).norm() > 0.1 * other.norm()  # the modes differ
        torch.testing.assert_close(k @ shift.T, d, atol=1e-6 * float(d.abs().max()), rtol=1e-6)


def test_joint_solve_fits_more_rows_than_one_layer_has_dimensions():
    """30 rows against layers of 12 inputs: no single layer can map every row to its value (per-layer
    solves summed leave a large residual) while the joint solve over three layers (36 inputs) fits them."""
    g = torch.Generator().manual_seed(4)
    keys = [torch.randn(30, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    values = [torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(3)]  # D_ℓ per layer
    total = sum(values)
    lams = torch.full((3,), -12.0, dtype=torch.float64)  # e^λ ≈ 6e-6: (almost) an exact fit where one exists
    per_layer = sum(k @ solve_shift(k.T @ k, d.T @ k, lam).T for k, d, lam in zip(keys, values, lams))
    joint = sum(k @ s.T for k, s in zip(keys, solve_joint(keys, total, lams)))
    assert (per_layer - total).norm() > 0.3 * total.norm()
    assert (joint - total).norm() < 1e-3 * total.norm()


def test_the_solve_stays_float32_under_bf16_autocast(make_editor):
    """trainer.precision=bf16-mixed (auto where the hardware has native bf16) runs training and
    validation under bf16 autocast; KᵀK in bf16 loses the small eigenvalues the solve divides by.
    Keys with one shared direction, as a template's keys have: the solve under autocast must match
    the float64 closed form, and the editor's own sums must come out float32."""
    g = torch.Generator().manual_seed(2)
    k = 0.3 * torch.randn(400, 96, generator=g) + 2.0 * torch.randn(96, generator=g)
    d = 1e-2 * torch.randn(400, 32, generator=g)
    lam = torch.tensor(0.0)
    k64, d64 = k.double(), d.double()
    expected = d64.T @ k64 @ torch.linalg.inv(k64.T @ k64 + torch.eye(96, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram, cross = normal_terms(k, d)
        shift = solve_shift(gram, cross, lam)
    assert gram.dtype == cross.dtype == shift.dtype == torch.float32
    assert (shift.double() - expected).norm() < 1e-3 * expected.norm()
    ed = make_editor("malmen", "tiny-llama")
    batch = ed.formatter.batch(*zip(*requests(3)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sums, shifts = ed.normal_equations(batch), ed.weight_shifts(batch)
    assert all(gm.dtype == cr.dtype == torch.float32 for gm, cr in sums)
    assert all(s.dtype == torch.float32 for s in shifts)


def test_key_covariance_regularises_the_solve_with_the_keys_second_moment(tiny, tmp_path):
    """key_covariance=ρ: the solve's regulariser is C + ρ·mean(diag C)·I scaled to mean diagonal 1 (C
    from the key statistics), the setting survives a save/load, and at a large λ the shift moves
    the keys' dominant direction (what every text's keys share) far less than the identity's."""
    from metaedit.locate.solve import regularised
    from metaedit.locate.stats import StatsSpec, second_moments
    from metaedit.models.inner_params import resolve_inner_params

    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    stats = {"n_tokens": 3000, "seq_len": 64}
    plain = build_editor("malmen", model, cfg, {"rank": 8}, tokenizer=tok, inner_params=inner)
    cov = build_editor("malmen", model, cfg, {"rank": 8, "key_covariance": 1e-2, "stats": stats}, tokenizer=tok,
                       inner_params=inner, cache_dir=tmp_path)
    batch = plain.formatter.batch(*zip(*requests(3)))
    _non_trivial(plain, batch)
    cov.load_state_dict(plain.state_dict())
    cov.eval()  # (training mode would move the networks' running input statistics on every pass)
    cov.prepare()
    layers = [int(p.module_name.split(".")[2]) for p in inner]
    moments = second_moments(model, tok, sorted(set(layers)), StatsSpec(**stats), tmp_path)
    with torch.no_grad():
        sums = cov.normal_equations(batch)
        for i, (ell, (gram, cross), shift) in enumerate(zip(layers, sums, cov.weight_shifts(batch))):
            r = regularised(moments[ell], 1e-2)
            r = (r / torch.diagonal(r).mean()).float()
            torch.testing.assert_close(shift, solve_shift(gram, cross, cov.log_lambdas[i], r), rtol=1e-4, atol=1e-7)
        for ed in (plain, cov):
            ed.log_lambdas.fill_(12.0)
        for ell, p_shift, c_shift in zip(layers, plain.weight_shifts(batch), cov.weight_shifts(batch)):
            top = torch.linalg.eigh(moments[ell].double()).eigenvectors[:, -1].float()
            assert (c_shift @ top).norm() / c_shift.norm() < 0.5 * (p_shift @ top).norm() / p_shift.norm()
    save_editor(cov, tmp_path / "ed")
    back = load_editor(tmp_path / "ed", model=model, tokenizer=tok, cache_dir=tmp_path)
    assert back.hparams()["key_covariance"] == 1e-2 and back.covariance.stats == cov.covariance.stats
    assert plain.hparams()["key_covariance"] is None
    with pytest.raises(MetaEditError, match="key_covariance must be > 0"):
        build_editor("malmen", model, cfg, {"key_covariance": 0.0}, tokenizer=tok, inner_params=inner)
    with pytest.raises(MetaEditError, match="key_covariance needs every inner parameter to be an MLP output projection"):
        build_editor("malmen", model, cfg, {"key_covariance": 1e-2}, tokenizer=tok)  # default: gate/up_proj too


def _non_trivial(ed, batch, reqs=None):
    torch.manual_seed(0)
    ed.train()
    ed.transform(ed.capture(batch, reqs))  # running statistics
    ed.eval()
    with torch.no_grad():
        for net in ed.nets.values():
            for t in (*net.up, *net.bias):
                t.add_(torch.randn_like(t) * 0.1)
        ed.edit_lrs.copy_(torch.rand_like(ed.edit_lrs))
        ed.log_lambdas.copy_(torch.rand_like(ed.log_lambdas))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_chunked_and_unchunked_shifts_agree_and_large_lambda_gives_mends_update(tiny, name):
    # In float64 (a copy of the base, the editor converted): a chunk's rows go through the base and the
    # networks in a batch of another size, which in float32 moves them by ~1e-7 relative (kernels per
    # batch shape) and the sums by up to ~1e-6 — rounding of recomputation, not of the chunked sums
    # this test is about.
    model, tok, cfg = tiny(name)
    ed = build_editor("malmen", copy.deepcopy(model).double(), cfg, {"chunk_size": 64}, tokenizer=tok).double()
    batch = ed.formatter.batch(*zip(*requests(5)))
    _non_trivial(ed, batch)
    with torch.no_grad():
        whole = ed.normal_equations(batch)
        ed.chunk_size = 2
        chunked = ed.normal_equations(batch)
        for (g1, c1), (g2, c2) in zip(whole, chunked):  # the same sums, in another order
            assert (g1 - g2).norm() <= 1e-6 * g1.norm() and (c1 - c2).norm() <= 1e-6 * c1.norm()
        # The chunked shift solves the unchunked normal equations (KᵀK + e^λ I) ΔWᵀ = KᵀD up to rounding
        # (compared by residual: with few rows KᵀK + e^λ I is ill-conditioned, so ΔW itself
        # may move more than the rounding).
        for (g, c), lam, shift in zip(whole, ed.log_lambdas, ed.weight_shifts(batch)):
            residual = (g + lam.exp() * torch.eye(g.shape[0])) @ shift.T - c.T
            assert residual.norm() <= 1e-4 * c.norm(), float(residual.norm() / c.norm())
        ed.chunk_size = 64
        # λ → ∞: e^λ ΔW → Σ_t d_t u_tᵀ with d_t = η (u_t·ũ_t) δ̃_t: the keys are the layer's real
        # inputs u, each value shift the output change MEND's step η δ̃_t ũ_tᵀ makes at u_t.
        ed.log_lambdas.fill_(30.0)
        far = ed.weight_shifts(batch)
        raw = ed.capture(batch)
        for i, ((u, _), (u_t, d_t), shift) in enumerate(zip(raw, ed.transform(raw), far)):
            summed = (ed.edit_lrs[i] * (u * u_t).sum(-1, keepdim=True) * d_t).T @ u
            torch.testing.assert_close(shift * torch.tensor(30.0).exp(), summed, atol=1e-4, rtol=1e-3)
        # W' = W − ΔW (Conv1D stored transposed)
        edited = ed.apply_edits(batch, []).params
        for p, shift in zip(ed.inner_params, far):
            w = ed.model.get_parameter(p.name)
            torch.testing.assert_close(edited[p.name], w - (shift.T if p.transposed else shift))



def test_joint_shifts_agree_chunked_and_fit_the_rows_total_value_shift(tiny):
    """solve=joint on the editor: every chunk's rows are stacked before the one solve (chunk_size does
    not change ΔW), and at a small λ the layers' shifts together give each edit row the sum of its
    value shifts over the layers, Σ_ℓ K_ℓ ΔW_ℓᵀ = Σ_ℓ D_ℓ."""
    model, tok, cfg = tiny("tiny-llama")
    base = copy.deepcopy(model).double()
    # Every block's down_proj: they all write into the residual stream, whose changes the joint fit adds.
    inner = resolve_inner_params(base, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    ed = build_editor("malmen", base, cfg, {"chunk_size": 64, "solve": "joint", "rows": "target"}, tokenizer=tok,
                      inner_params=inner).double()
    batch = ed.formatter.batch(*zip(*requests(5)))
    _non_trivial(ed, batch)
    with torch.no_grad():
        ed.log_lambdas.fill_(-20.0)
        whole = ed.weight_shifts(batch)
        ed.chunk_size = 2
        chunked = ed.weight_shifts(batch)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        rows = [kd for kd, _, _ in ed.key_value_rows(batch)]
        keys = [torch.cat([part[i][0] for part in rows]) for i in range(len(ed.inner_params))]
        total = sum(torch.cat([part[i][1] for part in rows]) for i in range(len(ed.inner_params)))
        fit = sum(k @ s.T for k, s in zip(keys, whole))
        assert (fit - total).norm() < 1e-4 * total.norm(), float((fit - total).norm() / total.norm())
        # The per-layer solves of the same rows do not: each layer gives its own D_ℓ, not a share of the sum.
        ed.solve = "per_layer"
        per_layer = sum(k @ s.T for k, s in zip(keys, ed.weight_shifts(batch)))
        assert (per_layer - total).norm() < 1e-4 * total.norm()  # rows < d_in here: every layer fits its own
        assert sum((a - b).norm() for a, b in zip(whole, ed.weight_shifts(batch))) > 0
    with pytest.raises(MetaEditError, match="solve must be 'per_layer', 'joint' or 'pseudo_span'"):
        build_editor("malmen", model, cfg, {"solve": "both"}, tokenizer=tok)
    with pytest.raises(MetaEditError, match="write into one space"):  # the default: gate/up/down projections
        build_editor("malmen", model, cfg, {"solve": "joint", "rows": "target"}, tokenizer=tok)
    with pytest.raises(MetaEditError, match="needs rows=target"):
        build_editor("malmen", model, cfg, {"solve": "joint"}, tokenizer=tok, inner_params=inner)


def test_each_edits_key_gets_the_change_mends_own_step_makes_there(make_editor):
    """With few keys and a small λ the solve interpolates: at each edit's key u (the subject's last
    token, the layer's real input) W' − W changes the output by −η (u·ũ) δ̃, exactly what MEND's
    rank-1 step −η δ̃ ũᵀ for that edit alone makes at u — so a batch of edits keeps every edit's own
    change instead of summing updates that disturb each other's keys. Solving with the pseudo keys
    ũ (which the layer never reads) fails this."""
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS

    ed = make_editor("malmen", "tiny-gpt2", rows="subject_last")
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(3))]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)
    with torch.no_grad():
        ed.log_lambdas.fill_(-12.0)
        shifts = ed.weight_shifts(batch, reqs)
        raw = ed.capture(batch, reqs)
        checked = 0
        for i, ((u, _), (u_t, d_t), shift) in enumerate(zip(raw, ed.transform(raw), shifts)):
            if u.shape[0] == 0:
                continue  # (a last block's output at the subject reaches no target: no rows)
            mend_change = ed.edit_lrs[i] * (u * u_t).sum(-1, keepdim=True) * d_t  # per edit, at its own u
            torch.testing.assert_close(u @ shift.T, mend_change, atol=1e-4 * float(mend_change.abs().max()), rtol=1e-3)
            pseudo = solve_shift(u_t.T @ u_t, mend_change.T @ u_t, ed.log_lambdas[i])
            assert (u @ pseudo.T - mend_change).norm() > 0.1 * mend_change.norm()
            checked += 1
        assert checked > 0

def test_answer_rows_keep_one_key_per_edit_the_one_that_predicts_the_answer(make_editor):
    """rows=answer: of the target rows (every position scoring a target token) only the first of each
    edit, the prompt's last token, is a row of the solve; the positions inside a multi-token target
    are not: the solve's update then has one direction per edit, where the target rows' has one per
    scored position."""
    from metaedit.editors.rows import answer_mask
    from metaedit.types import EditRequest

    ed = make_editor("malmen", "tiny-llama", rows="target")
    reqs = [EditRequest(p, t) for p, t in requests(4)]
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    scored = answer_mask(batch.targets)
    first = answer_mask(batch.targets, first_only=True)
    assert int(scored.sum()) > len(reqs)  # some target is more than one token: the modes differ
    assert first.sum(-1).tolist() == [1] * len(reqs)
    assert (first.int().argmax(-1) == scored.int().argmax(-1)).all()
    _non_trivial(ed, batch, reqs)
    with torch.no_grad():
        every = ed.capture(batch, reqs)
        ed.rows = "answer"
        answer = ed.capture(batch, reqs)
        order = torch.nonzero(scored.reshape(-1)).squeeze(-1)  # target rows, in capture order
        firsts = torch.nonzero(first.reshape(-1)[order]).squeeze(-1)
        for (u_all, d_all), (u, d) in zip(every, answer):
            assert u.shape[0] == len(reqs) == d.shape[0]
            torch.testing.assert_close(u, u_all[firsts])
            torch.testing.assert_close(d, d_all[firsts])
        ranks = {}
        for rows in ("answer", "target"):
            ed.rows = rows
            svs = [torch.linalg.svdvals(shift.double()) for shift in ed.weight_shifts(batch, reqs)]
            ranks[rows] = [int((sv > 1e-3 * sv[0]).sum()) for sv in svs]
        assert max(ranks["answer"]) <= len(reqs) < min(ranks["target"])


def test_further_solves_read_the_edited_model_and_lower_the_edit_loss(make_editor):
    """edit_steps=3 at edit time: a further solve reads keys and gradients on the model the earlier
    solve edited (W'' = W' − ΔW(W')), so the edits' loss falls below one solve's; solving stops once
    every edit lands; training keeps one solve (what meta-training learns)."""
    ed = make_editor("malmen", "tiny-gpt2", edit_steps=3)
    reqs = requests(3)
    batch = ed.formatter.batch(*zip(*reqs))
    ed.train()
    ed.transform(ed.capture(batch))  # running statistics; the networks stay at their initial (identity) map,
    ed.eval()                        # so each solve's value shifts are gradient-descent steps
    with torch.no_grad():
        ed.edit_lrs.fill_(3e-3)  # steps too small to land every edit at once
        one = ed.shifted(ed.weight_shifts(batch, []))
        two = ed.shifted([a + b for a, b in zip(ed.weight_shifts(batch, []), ed.weight_shifts(batch, [], one.params))])
        three = ed.apply_edits(batch, [])
        losses = [float(nll(forward_logits(ed.model, batch, m.params), batch.targets)) for m in (one, two, three)]
        base = float(nll(forward_logits(ed.model, batch), batch.targets))
    assert base > losses[0] > 10 * losses[1], (base, losses)
    # Two solves landed every edit (greedy answers are the targets), so the third solve is not made.
    assert bool(exact_correct(forward_logits(ed.model, batch, two.params), batch.targets).all())
    for name, w in two.params.items():
        torch.testing.assert_close(three.params[name], w)
    solves = []
    shifts = ed.weight_shifts
    ed.weight_shifts = lambda *a, **kw: solves.append(a) or shifts(*a, **kw)
    ed.train()
    with torch.no_grad():
        ed.apply_edits(batch, [])
    ed.eval()
    assert len(solves) == 1


def _output_change(ed, keys: torch.Tensor, after: dict, before: dict | None, i: int) -> torch.Tensor:
    """keys [rows, d_in] times inner layer i's weight change from `before` (None: the base) to `after`."""
    p = ed.inner_params[i]
    delta = after[p.name] - (ed.model.get_parameter(p.name) if before is None else before[p.name])
    return keys @ (delta if p.transposed else delta.T)


@pytest.mark.parametrize("solve", ["per_layer", "joint"])
def test_keep_earlier_fits_the_earlier_steps_keys_to_a_zero_shift_in_a_sequence(tiny, tmp_path, solve):
    """keep_earlier μ_E: in a sequence, a step's solve is (KᵀK + μ_E Σ K_EᵀK_E + e^λ I)⁻¹ KᵀD with K_E
    the earlier steps' keys (read on the model they were edited from) — the joint solve has them as
    rows fitted to zero — so at a large μ_E the later step leaves the earlier edits' keys (almost)
    where the earlier step put them; the state saves and loads (a resumed sequence), a new sequence
    starts empty, and an edit outside a sequence keeps nothing."""
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS

    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(4))]
    first, second = reqs[:2], reqs[2:]
    shifts_at_first = {}
    model, tok, cfg = tiny("tiny-gpt2")
    # The joint solve needs layers writing into one space: every block's MLP output projection.
    inner = None if solve == "per_layer" else resolve_inner_params(
        model, [{"container": "transformer.h", "depth": [0.0, 1.0], "pattern": r"mlp\.c_proj"}])
    name_of_state = "earlier" if solve == "per_layer" else "earlier_keys"
    for mu in (0.0, 1e4):
        torch.manual_seed(0)  # the same editor both times: only μ_E differs
        ed = build_editor("malmen", model, cfg, {"rows": "target", "keep_earlier": mu, "solve": solve}, tokenizer=tok,
                          inner_params=inner)
        b1, b2 = (ed.formatter.batch([r.prompt for r in rs], [r.target for r in rs]) for rs in (first, second))
        _non_trivial(ed, b1, first)
        with torch.no_grad():
            ed.log_lambdas.fill_(-4.0)
            own = [k for k, _ in ed.capture(b1, first)]  # step 1's keys on the base
            own2 = [k for k, _ in ed.capture(b2, second)]
            ed.apply_edits(b1, first)
            assert ed.earlier == []  # not a sequence: nothing kept
            steps: list[dict] = []
            ed.edit_sequential(first + second, batch_size=2, after_each=lambda _, m, into=steps: into.append(dict(m.params)))
        if mu:
            # Both steps' KᵀK, or their keys (on the first inner layer the keys are the base's whatever
            # was edited).
            assert ed.earlier[0].dtype == torch.float32
            kept = own[0].T @ own[0] + own2[0].T @ own2[0] if solve == "per_layer" else torch.cat([own[0], own2[0]])
            torch.testing.assert_close(ed.earlier[0], kept, rtol=1e-4, atol=1e-4)
            state = ed.sequence_state()
            assert sorted(state) == sorted(f"{name_of_state}.{i}" for i in range(len(ed.inner_params)))
            ed.reset_sequence()
            assert ed.earlier == []
            ed.load_sequence_state(state)
            assert all(torch.equal(a, b) for a, b in zip(ed.earlier, state.values()))
            with pytest.raises(MetaEditError, match="keeps earlier"):
                ed.load_sequence_state({"preserved.3": state[f"{name_of_state}.0"]})
        # How much step 2 moved step 1's outputs, on the keys step 1 kept: per-layer solves keep each
        # layer's output, measured on the first inner layer (its input comes from below every edited
        # matrix, so the keys are the same on both models); the joint solve keeps the sum of the layers'
        # output changes at the kept rows (every layer's keys read on the base, as kept).
        layers = range(1) if solve == "per_layer" else range(len(ed.inner_params))

        shifts_at_first[mu] = (float(sum(_output_change(ed, own[i], steps[1], steps[0], i) for i in layers).norm()),
                               float(sum(_output_change(ed, own[i], steps[0], None, i) for i in layers).norm()))
    (moved_plain, step1_plain), (moved_kept, step1_kept) = shifts_at_first[0.0], shifts_at_first[1e4]
    assert step1_plain > 0 and moved_plain > 0.05 * step1_plain, shifts_at_first  # the later step disturbs them
    assert step1_kept == pytest.approx(step1_plain, rel=1e-4)  # a sequence's first step has nothing to keep
    assert moved_kept < 1e-2 * moved_plain, shifts_at_first
    with pytest.raises(MetaEditError, match="keep_earlier must be >= 0"):
        build_editor("malmen", model, cfg, {"keep_earlier": -1.0}, tokenizer=tok)
    save_editor(ed, tmp_path / "ed")
    assert json.loads((tmp_path / "ed" / "editor_config.json").read_text())["hparams"]["keep_earlier"] == 1e4


def test_max_shift_scales_a_large_shift_down_to_its_bound(make_editor):
    """max_shift c: each solve's ΔW_ℓ keeps its direction and is scaled to at most c·‖W_ℓ‖ (W_ℓ the
    weights it is applied to: in a sequence the running edit's), in training as at edit time (so a
    lifelong-trained editor learns under the bound it is used with); a shift within it is left alone."""
    ed = make_editor("malmen", "tiny-gpt2", rows="target")
    reqs = requests(2)
    batch = ed.formatter.batch(*zip(*reqs))
    _non_trivial(ed, batch)
    with torch.no_grad():
        free = ed.weight_shifts(batch)
        base = {p.name: ed.model.get_parameter(p.name).detach().clone() for p in ed.inner_params}
        ratios = [float(s.norm() / base[p.name].norm()) for p, s in zip(ed.inner_params, free)]
        c = 0.5 * min(ratios)  # every layer's shift is above the bound
        ed.max_shift = c
        edited = ed.apply_edits(batch, [])
        for p, s in zip(ed.inner_params, free):
            got = edited.params[p.name] - base[p.name]
            got = got.T if p.transposed else got
            torch.testing.assert_close(got, -s * (c * base[p.name].norm() / s.norm()), rtol=1e-4, atol=1e-7)
        ed.max_shift = 2 * max(ratios)  # above every shift: nothing changes
        assert all(torch.equal(a, b) for a, b in zip(ed.bounded(free), free))
        ed.max_shift = c
        at_edit_time = ed.bounded(free)
        ed.train()
        assert all(torch.equal(a, b) for a, b in zip(ed.bounded(free), at_edit_time))
        ed.eval()
        # In a sequence the bound is taken on the running weights: doubled weights, a doubled bound.
        doubled = {n: 2 * w for n, w in base.items()}
        for a, b in zip(ed.bounded(free, doubled), ed.bounded(free)):
            assert float(a.norm()) == pytest.approx(2 * float(b.norm()), rel=1e-4)
    with pytest.raises(MetaEditError, match="max_shift must be > 0"):
        make_editor("malmen", "tiny-gpt2", max_shift=0.0)


def test_decoupled_training_gradient_equals_the_direct_one(make_editor):
    ed = make_editor("malmen", "tiny-gpt2", chunk_size=64)
    reqs = requests(3)
    batch = ed.formatter.batch(*zip(*reqs))
    _non_trivial(ed, batch)
    from metaedit.data.datamodule import EditCollator
    from tests.test_protocols import _record

    eb = EditCollator(ed.formatter, sample=False)([_record(p, t) for p, t in reqs])
    system = EditorSystem(ed, prefix_cache=False)

    def grads(run) -> list[torch.Tensor]:
        ed.zero_grad(set_to_none=True)
        logs = run(eb, system._objective, lambda loss, check=None: loss.backward())
        return logs["loss"], [p.grad.clone() for p in ed.parameters() if p.requires_grad and p.grad is not None]

    direct_loss, direct = grads(lambda *a: type(ed).__mro__[2].training_loss_and_backward(ed, *a))  # Editor's default
    loss, decoupled = grads(ed.training_loss_and_backward)
    torch.testing.assert_close(loss, direct_loss)
    assert len(direct) == len(decoupled) and any(g.abs().sum() > 0 for g in direct)
    for a, b in zip(direct, decoupled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_batch_too_large_names_the_chunk_setting(make_editor):
    ed = make_editor("malmen", "tiny-gpt2", chunk_size=8, memory_cap_mb=1e-3)
    batch = ed.formatter.batch(*zip(*requests(4)))
    with pytest.raises(MetaEditError, match="chunk_size"):
        ed.apply_edits(batch, [])


@pytest.mark.slow
def test_malmen_trains_with_train_py_and_its_checkpoint_round_trips(tmp_path):
    # Lifelong on too: sequences of 3 steps, each step's loss with the previous 2 steps' edits.
    res = run_cli(["train.py", "method=malmen", "model=tiny-gpt2", "data=synthetic", "data.n_edits=6",
                   "method.editor.chunk_size=4", "method.editor.rank=16",
                   "method.loss.lifelong={steps_back:2,gamma:0.9,l2:0.001,seq_len:3}", *FAST], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "checkpoints" / "malmen-tiny-gpt2-synthetic"
    assert json.loads((run / "train_info.json").read_text())["steps"] == 6
    ed = load_editor(run)
    assert ed.method == "malmen" and ed.chunk_size == 4
    save_editor(ed, tmp_path / "again")
    again = load_editor(tmp_path / "again", model=ed.model, tokenizer=ed.formatter.tokenizer)
    for (k, a), (k2, b) in zip(ed.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    batch = ed.formatter.batch(*zip(*requests(2)))
    with torch.no_grad():
        before = nll(forward_logits(ed.model, batch), batch.targets)
        assert torch.equal(ed.apply_edits(batch, []).logits(batch), again.apply_edits(batch, []).logits(batch))
        assert nll(ed.apply_edits(batch, []).logits(batch), batch.targets) != before


def test_malmen_logs_its_learned_regularisers_beside_the_step_sizes(make_editor):
    ed = make_editor("malmen", "tiny-gpt2", lambda_init=-2.0)
    with torch.no_grad():
        ed.log_lambdas[0] = 1.5
    state = ed.state_to_log()
    n = len(ed.inner_params)
    assert float(state["log_lambda_max"]) == 1.5 and float(state["log_lambda_min"]) == -2.0
    assert float(state["log_lambda_mean"]) == pytest.approx((1.5 - 2.0 * (n - 1)) / n)
    assert "edit_lr_mean" in state  # MEND's step sizes still logged


@pytest.mark.parametrize("method", ["mend", "malmen"])
def test_lifelong_loss_includes_the_earlier_edits_of_the_sequence(make_editor, method):
    from metaedit.data.datamodule import EditCollator
    from tests.test_editors import TEST_SUBJECTS, WORLD
    from tests.test_protocols import _record

    ed = make_editor(method, "tiny-gpt2")
    ed.eval()  # frozen running norms: the runs below see the same networks
    reqs = requests(4)
    collate = EditCollator(ed.formatter, sample=False)
    first, second = collate([_record(*r) for r in reqs[:2]]), collate([_record(*r) for r in reqs[2:]])
    other_targets = [next(o for o in WORLD.objects["capital"] if o not in (t, WORLD.facts[(s, "capital")]))
                     for s, (_, t) in zip(TEST_SUBJECTS, reqs[:2])]
    first_changed = collate([_record(p, t) for (p, _), t in zip(reqs[:2], other_targets)])

    def second_step(first_batch):
        system = EditorSystem(ed, prefix_cache=False, lifelong={"steps_back": 2, "gamma": 0.5, "l2": 1.0, "seq_len": 4})

        def backward(loss, check=None):
            loss.backward()
            system._finite = True

        system._backward = backward
        logs1, _ = system.outer_step(first_batch)
        assert "loss_edit_prev" not in logs1 and system._running  # the next step starts from this edit
        ed.zero_grad(set_to_none=True)
        logs2, finite = system.outer_step(second)
        assert finite and logs2["loss_edit_prev"] > 0 and logs2["loss_l2"] > 0
        return logs2, [p.grad.clone() for p in ed.parameters() if p.grad is not None]

    logs, grads = second_step(first)
    logs_changed, grads_changed = second_step(first_changed)
    # Step 2's own edits are the same; only the earlier edits' targets differ, and so do loss and gradient.
    assert logs["loss_edit_prev"] != logs_changed["loss_edit_prev"] and logs["loss"] != logs_changed["loss"]
    assert any(not torch.allclose(a, b) for a, b in zip(grads, grads_changed))


def test_lifelong_training_keeps_the_earlier_steps_keys_within_its_sequence(make_editor):
    """keep_earlier in lifelong training: a step's solve adds μ_E·Σ K_EᵀK_E of its sequence's earlier
    steps (keys read on the model each was edited from), as at edit time; a new sequence starts with
    none kept, and without lifelong every step is its own sequence."""
    from metaedit.data.datamodule import EditCollator
    from tests.test_protocols import _record

    mu = 3.0
    ed = make_editor("malmen", "tiny-gpt2", rows="target", keep_earlier=mu)
    ed.eval()  # frozen running norms
    reqs = requests(4)
    collate = EditCollator(ed.formatter, sample=False)
    first, second = collate([_record(*r) for r in reqs[:2]]), collate([_record(*r) for r in reqs[2:]])
    solves: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (the edits' own KᵀK, the solve's gram) per step
    plain = ed.normal_equations

    def spy(edit, requests=None, params=None, avoid=(), edit_grams=None, pseudo_keys=None):
        own: list[torch.Tensor] = []
        out = plain(edit, requests, params, avoid, own, pseudo_keys)
        if edit_grams is not None:
            edit_grams.extend(own)
        solves.append(([g.detach().float() for g in own], [g.detach().float() for g, _ in out]))
        return out

    ed.normal_equations = spy

    def steps(lifelong, *batches):
        system = EditorSystem(ed, prefix_cache=False, lifelong=lifelong)

        def backward(loss, check=None):
            loss.backward()
            system._finite = True

        system._backward = backward
        solves.clear()
        for b in batches:
            system.outer_step(b)
            ed.zero_grad(set_to_none=True)
        return list(solves)

    seq = {"steps_back": 1, "gamma": 0.5, "l2": 0.0, "seq_len": 2}
    (own1, gram1), (own2, gram2), (own3, gram3) = steps(seq, first, second, first)
    for i in range(len(ed.inner_params)):
        torch.testing.assert_close(gram1[i], own1[i])  # a sequence's first step keeps nothing
        torch.testing.assert_close(gram2[i], own2[i] + mu * own1[i], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(gram3[i], own3[i])  # seq_len 2: step 3 starts a new sequence
    assert all(float(g.abs().max()) > 0 for g in own1)
    # Without lifelong, no step keeps another's keys.
    (own1, gram1), (own2, gram2) = steps(None, first, second)
    for i in range(len(ed.inner_params)):
        torch.testing.assert_close(gram2[i], own2[i])


def test_malmen_regularisers_get_their_own_learning_rate(make_editor, make_data):
    """lambda_lr puts λ in its own optimizer group without weight decay, where Adam moves it by about
    that rate per step (at the networks' rate it would not move: session 25's λ stayed within ±0.02)."""
    from tests.test_editors import assert_own_learning_rate

    ed = make_editor("malmen", "tiny-gpt2", edit_lr=1e-3, lambda_lr=0.05)
    start = ed.log_lambdas.detach().clone()
    assert_own_learning_rate(ed, ed.log_lambdas, 0.05, make_data)
    assert (ed.log_lambdas.detach() - start).abs().max() > 0.01
    with pytest.raises(MetaEditError, match="lambda_lr must be > 0"):
        make_editor("malmen", "tiny-gpt2", lambda_lr=0.0)


def _fact_records(subjects: list[str]) -> list[dict]:
    from tests.test_editors import WORLD

    out = []
    for s in subjects:
        true = WORLD.facts[(s, "capital")]
        new = next(o for o in WORLD.objects["capital"] if o != true)
        out.append({"case_id": f"capital:{s}", "subject": s, "prompt": f"The capital of {s} is", "target_new": new,
                    "target_true": true, "rephrases": [f"{s}'s capital is"],
                    "locality": [{"prompt": f"The capital city of {s} is", "answer": true}]})
    return out


def _with_spec(bank, spec, fn, *args):
    """fn(*args) with the preserved-keys `bank` under another spec (None: no preserve) for that call only."""
    kept, bank.spec = bank.spec, spec
    try:
        return fn(*args)
    finally:
        bank.spec = kept


def test_preserved_facts_are_fitted_to_a_zero_shift_and_never_the_edited_subjects(make_editor, tiny, tmp_path):
    """preserve: the solve adds μ K_PᵀK_P, K_P the answer-position keys of the training facts nearest
    each edit row (top_k per row, each once); a fact that names an edited subject is never one of
    them (its key at "The capital of X is" *is* the edit's key); with a large μ the shift leaves the
    preserved keys' outputs (nearly) unchanged while it still moves the edits'; the setting
    survives a save/load."""
    from tests.test_editors import TEST_SUBJECTS, WORLD

    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:12]
    data = tmp_path / "data"
    data.mkdir()
    # The first test subject's own fact is in the bank: it must be excluded when that subject is edited.
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects + TEST_SUBJECTS[:1])))
    from metaedit.types import EditRequest

    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    spec = {"data": str(data), "weight": 1.0, "top_k": 3, "max_facts": None}
    ed = make_editor("malmen", "tiny-llama", rows="target", preserve=spec)
    ed.cache_dir = str(tmp_path / "cache")  # the bank's cache
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)
    bank = ed.preserve

    def unpreserved(fn, *args):  # the same editor's sums / shifts without the preserved keys
        return _with_spec(bank, None, fn, *args)

    with torch.no_grad():
        ed.log_lambdas.fill_(-4.0)
        bank.prepare(ed)
        n_answer_tokens = sum(len(ed.formatter.target_ids(f.answer)) for f in bank.facts)
        assert all(k.shape[0] == n_answer_tokens for k in bank._keys)  # one key per answer-predicting row
        own = [j for j, f in enumerate(bank.facts) if TEST_SUBJECTS[0] in f.prompt]
        assert own, "the edited subject's own facts are in the bank"
        excluded = bank.excluded_rows([r.subject for r in reqs], batch.prompts)
        assert excluded.any() and bool((bank._fact_of_row[excluded].unsqueeze(-1) == torch.tensor(own)).any(-1).all())
        k = ed.capture(batch, reqs)[0][0]
        none = torch.zeros_like(excluded)
        # Unexcluded, the edit's own prompt finds its own fact first (the same prefix: the same key).
        first = bank._fact_of_row[bank.nearest(0, k[:1], none)[0]]
        assert bank.facts[int(first)].prompt == reqs[0].prompt
        picked = bank._fact_of_row[bank.nearest(0, k, excluded)]
        assert not any(TEST_SUBJECTS[0] in bank.facts[int(j)].prompt for j in picked)
        # The normal equations: KᵀK + μ K_PᵀK_P, the same DᵀK.
        with_p, without = ed.normal_equations(batch, reqs), unpreserved(ed.normal_equations, batch, reqs)
        for i, ((g1, c1), (g0, c0)) in enumerate(zip(with_p, without)):
            ki = ed.capture(batch, reqs)[i][0]
            rows = torch.cat([bank.nearest(i, ki[j : j + 1], excluded) for j in range(ki.shape[0])]).unique()
            kp = bank._keys[i][rows]
            torch.testing.assert_close(g1, g0 + kp.T @ kp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c1, c0)
        # A large μ: the preserved keys' outputs barely move, the edits' still do.
        ed.preserve.spec = dataclasses.replace(ed.preserve.spec, weight=1e4)
        i = len(ed.inner_params) - 1
        ki = ed.capture(batch, reqs)[i][0]
        kp = bank._keys[i][bank.nearest(i, ki, excluded).unique()]
        shift, shift0 = ed.weight_shifts(batch, reqs)[i], unpreserved(ed.weight_shifts, batch, reqs)[i]
        assert (kp @ shift.T).norm() < 0.05 * (kp @ shift0.T).norm()
        assert (ki @ shift.T).norm() > 0.2 * (ki @ shift0.T).norm()
        # Under bf16 autocast (bf16-mixed training) the preserved term stays a float32 product.
        rows = torch.arange(bank._keys[i].shape[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = bank.gram(i, rows)
        torch.testing.assert_close(auto, bank.gram(i, rows), rtol=0, atol=0)
    saved = save_editor(ed, tmp_path / "ed")
    model, tok, _ = tiny("tiny-llama")
    loaded = load_editor(saved, model=model, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert loaded.preserve.spec is not None and loaded.preserve.spec.top_k == 3
    cached = list((tmp_path / "cache" / "preserve").glob("bank.*.safetensors"))
    assert len(cached) == 1  # read once, then cached
    loaded.preserve.prepare(loaded)
    torch.testing.assert_close(loaded.preserve._keys[0], bank._keys[0])  # the cache gives the same bank
    # A truncated cache file is read again from the facts, not a traceback from safetensors.
    cached[0].write_bytes(cached[0].read_bytes()[:100])
    again = load_editor(saved, model=model, tokenizer=tok, cache_dir=tmp_path / "cache")
    again.preserve.prepare(again)
    torch.testing.assert_close(again.preserve._keys[0], bank._keys[0])


def test_subject_swaps_put_training_subjects_into_the_edit_template_and_are_fitted_to_zero(make_editor, tiny, tmp_path):
    """preserve.swaps: each edit's prompt with other subjects — those training facts name in the same
    template, never an edited subject or a prompt the step scores — followed by the edit's new object;
    the solve adds μ_S K_SᵀK_S over their answer-predicting keys (the same DᵀK), so at a large μ_S their
    outputs barely move while the edits' still do; bad settings are refused; the setting round-trips."""
    from metaedit.editors.preserve import PreserveSpec
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS, WORLD

    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:12]
    data = tmp_path / "data"
    data.mkdir()
    # The first test subject's fact is in the training split: it must never be swapped into an edit.
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects + TEST_SUBJECTS[:1])))
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    spec = {"data": str(data), "weight": 1.0, "top_k": 3, "max_facts": None, "swaps": 3}
    ed = make_editor("malmen", "tiny-llama", rows="target", preserve=spec)
    ed.cache_dir = str(tmp_path / "cache")
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)
    bank = ed.preserve
    bank.prepare(ed)
    pairs = bank.swap_prompts(reqs)
    assert len(pairs) == 6 and pairs == bank.swap_prompts(reqs)  # 3 per edit, a seeded choice
    for j, r in enumerate(reqs):
        for prompt, target in pairs[3 * j : 3 * j + 3]:
            other = prompt.removeprefix("The capital of ").removesuffix(" is")
            assert target == r.target and other in train_subjects  # the edit's template and new object
    # A prompt the step scores is never a swap; an edit without its subject in the prompt has none.
    assert pairs[0][0] not in [p for p, _ in bank.swap_prompts(reqs, avoid=[pairs[0][0]])]
    assert bank.swap_prompts([EditRequest("Paris is the capital of", "France", "Rome")]) == []

    def unswapped(fn, *args):  # the same editor's sums / shifts without the swaps
        return _with_spec(bank, dataclasses.replace(bank.spec, swaps=0), fn, *args)

    with torch.no_grad():
        ed.log_lambdas.fill_(-4.0)
        swapped = ed.formatter.batch([p for p, _ in pairs], [t for _, t in pairs])
        with_s, without = ed.normal_equations(batch, reqs), unswapped(ed.normal_equations, batch, reqs)
        for i, ((g1, c1), (g0, c0)) in enumerate(zip(with_s, without)):
            ks = ed.capture(swapped, [EditRequest(p, t) for p, t in pairs])[i][0]  # target rows, read as edits
            torch.testing.assert_close(g1, g0 + ks.T @ ks, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c1, c0)
        bank.spec = dataclasses.replace(bank.spec, swap_weight=1e4)
        i = len(ed.inner_params) - 1
        ks = ed.capture(swapped, [EditRequest(p, t) for p, t in pairs])[i][0]
        ki = ed.capture(batch, reqs)[i][0]
        shift, shift0 = ed.weight_shifts(batch, reqs)[i], unswapped(ed.weight_shifts, batch, reqs)[i]
        assert (ks @ shift.T).norm() < 0.05 * (ks @ shift0.T).norm()
        assert (ki @ shift.T).norm() > 0.2 * (ki @ shift0.T).norm()
        # ENN's and KE's preserved columns (√μ K_Pᵀ) end with the swaps' (√μ_S K_Sᵀ).
        cols = bank.for_step(ed, [ed.capture(batch, reqs)[j][0] for j in range(len(ed.inner_params))], batch, reqs)[i]
        torch.testing.assert_close(cols[:, -ks.shape[0]:], 1e2 * ks.T, rtol=1e-4, atol=1e-4)
    for bad, field in (({"swaps": -1}, "swaps"), ({"swap_weight": 0.0}, "swap_weight")):
        with pytest.raises(MetaEditError, match=f"preserve.{field} must be"):
            PreserveSpec(data=str(data), **bad)
    bank.spec = dataclasses.replace(bank.spec, swap_weight=1.0)
    saved = save_editor(ed, tmp_path / "ed")
    model, tok, _ = tiny("tiny-llama")
    loaded = load_editor(saved, model=model, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert loaded.preserve.spec is not None and loaded.preserve.spec.swaps == 3


def test_rephrase_writes_each_edit_also_in_its_relations_training_phrasings(make_editor, tmp_path):
    """rephrase (edit time only): each edit is also written, as further edits, in the rephrase templates
    of the training records whose edit prompt shares its template, filled with its own subject and
    target; the shift is then the solve over the edits and those rephrasings together. Training steps
    are not expanded; an edit without its subject in the prompt gets none; bad settings are refused;
    the setting round-trips."""
    from metaedit.editors.rephrase import RephraseSpec
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS, WORLD

    data = tmp_path / "data"
    data.mkdir()
    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:4]
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects)))  # rephrase: "<X>'s capital is"
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    ed = make_editor("malmen", "tiny-llama", rows="target", rephrase={"data": str(data), "per_edit": 2})
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)
    extra = ed.rephrase.expand(reqs)
    assert extra == [EditRequest(f"{r.subject}'s capital is", r.target, r.subject) for r in reqs]
    assert ed.rephrase.expand([EditRequest("Paris is the capital of", "France", "Rome")]) == []
    both = [*reqs, *extra]
    with torch.no_grad():
        ed.log_lambdas.fill_(-4.0)
        shifts = ed.apply_edits(batch, reqs).params
        expected = ed.shifted(ed.weight_shifts(ed.formatter.batch([r.prompt for r in both], [r.target for r in both]), both)).params
        plain = ed.shifted(ed.weight_shifts(batch, reqs)).params
    for name in shifts:
        torch.testing.assert_close(shifts[name], expected[name])
        assert not torch.allclose(shifts[name], plain[name])
    ed.train()  # a training step's solve sees its own edits only

    def expand_in_training(_):
        raise AssertionError("rephrasings added in training")

    ed.rephrase.expand = expand_in_training
    with torch.no_grad():
        ed.apply_edits(batch, reqs)
    ed.eval()
    with pytest.raises(MetaEditError, match="rephrase.per_edit must be >= 1"):
        RephraseSpec(data=str(data), per_edit=0)
    with pytest.raises(MetaEditError, match="rephrase: .*fields: data, per_edit, seed"):
        RephraseSpec.coerce({"data": str(data), "templates": 3})
    saved = save_editor(ed, tmp_path / "ed")
    assert json.loads((saved / "editor_config.json").read_text())["hparams"]["rephrase"]["per_edit"] == 2


def test_inner_weight_weighs_the_rows_inside_each_answer_between_target_and_answer_rows(make_editor):
    """inner_weight w (rows=target): each edit's rows after its answer row enter KᵀK and DᵀK w times;
    w → 0 gives rows=answer's normal equations (the answer rows alone); bad settings are refused."""
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS

    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    ed = make_editor("malmen", "tiny-llama", rows="target")
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    assert all(len(ed.formatter.target_ids(r.target)) > 1 for r in reqs)  # there are rows inside the answers
    _non_trivial(ed, batch, reqs)
    with torch.no_grad():
        rows: list = []
        plain = ed.normal_equations(batch, reqs, edit_rows=rows)
        ed.inner_weight = 0.25
        weighted = ed.normal_equations(batch, reqs)
        for i, ((g, c), (g0, c0)) in enumerate(zip(weighted, plain)):
            k, d, owner = (torch.cat(x) for x in zip(*(chunk[i] for chunk in rows)))
            first = torch.cat([torch.ones(1, dtype=torch.bool), owner[1:] != owner[:-1]])
            assert 0 < first.sum() == len(reqs) < len(first)
            w = torch.where(first, 1.0, 0.25)[:, None]
            torch.testing.assert_close(g, (k * w).T @ k, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c, (d * w).T @ k, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(g, g0) and not torch.allclose(c, c0)
        ed.inner_weight = 1e-12
        tiny_w = ed.normal_equations(batch, reqs)
        ed.inner_weight, ed.rows = 1.0, "answer"
        answer = ed.normal_equations(batch, reqs)
    for (g, c), (ga, ca) in zip(tiny_w, answer):
        torch.testing.assert_close(g, ga, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, ca, rtol=1e-4, atol=1e-4)
    with pytest.raises(MetaEditError, match="inner_weight must be > 0"):
        make_editor("malmen", "tiny-llama", rows="target", inner_weight=0.0)
    with pytest.raises(MetaEditError, match="inner_weight weighs the rows inside the answer"):
        make_editor("malmen", "tiny-llama", rows="answer", inner_weight=0.5)


def test_joint_solve_fits_the_preserved_facts_summed_change_to_zero(tiny, tmp_path):
    """solve=joint with preserve: the bank rows nearest the edits' keys at any layer join the one solve
    as rows whose summed output change over the layers is fitted to zero; at a large μ that sum barely
    moves while the edit rows' still does."""
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS, WORLD

    data = tmp_path / "data"
    data.mkdir()
    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:12]
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects)))
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(2))]
    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "depth": [0.0, 1.0], "pattern": r"mlp\.down_proj"}])
    ed = build_editor("malmen", model, cfg, {"rows": "target", "solve": "joint", "preserve": {
        "data": str(data), "weight": 1e4, "top_k": 3, "max_facts": None}}, tokenizer=tok, inner_params=inner)
    ed.cache_dir = str(tmp_path / "cache")
    batch = ed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(ed, batch, reqs)
    bank = ed.preserve
    with torch.no_grad():
        ed.log_lambdas.fill_(-4.0)
        bank.prepare(ed)
        shifts = ed.weight_shifts(batch, reqs)
        kept, bank.spec = bank.spec, None
        plain = ed.weight_shifts(batch, reqs)
        bank.spec = kept
        captured = ed.capture(batch, reqs)
        excluded = bank.excluded_rows([r.subject for r in reqs], batch.prompts)
        rows = torch.cat([bank.nearest(i, k, excluded) for i, (k, _) in enumerate(captured)]).unique()

        def summed(keys_of, ws):  # Σ_ℓ K_ℓ ΔW_ℓᵀ
            return sum(keys_of(i) @ w.T for i, w in enumerate(ws))

        at_bank = lambda ws: summed(lambda i: bank._keys[i][rows], ws)  # noqa: E731
        at_edit = lambda ws: summed(lambda i: captured[i][0], ws)  # noqa: E731
        assert at_bank(shifts).norm() < 0.05 * at_bank(plain).norm()
        assert at_edit(shifts).norm() > 0.2 * at_edit(plain).norm()


def test_rows_per_layer_read_the_subject_at_one_layer_and_the_answer_at_another(tiny, tmp_path):
    """rows as a list (one mode per inner parameter): each layer's keys are those its own mode reads
    alone — the subject's last token at the first, every answer-predicting position at the second —
    and the preserved bank (answer-position keys) enters only the layer that reads answers; the
    list survives a save/load and a list that does not fit the layers is refused by name."""
    from metaedit.models.inner_params import resolve_inner_params
    from metaedit.types import EditRequest
    from tests.test_editors import TEST_SUBJECTS, WORLD

    model, tok, cfg = tiny("tiny-llama")
    inner = resolve_inner_params(model, [{"container": "model.layers", "layers": [0, 1], "pattern": r"mlp\.down_proj"}])
    train_subjects = [s for s in WORLD.subjects if WORLD.split_of[s] == "train"][:12]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(_fact_records(train_subjects)))
    spec = {"data": str(data), "weight": 1.0, "top_k": 3, "max_facts": None}

    def make(rows, **kw):
        ed = build_editor("malmen", model, cfg, {"rows": rows, **kw}, tokenizer=tok, inner_params=inner)
        ed.cache_dir = str(tmp_path / "cache")
        return ed

    mixed = make(["subject_last", "target"], preserve=spec)
    reqs = [EditRequest(p, t, TEST_SUBJECTS[i]) for i, (p, t) in enumerate(requests(3))]
    batch = mixed.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs])
    _non_trivial(mixed, batch, reqs)
    with torch.no_grad():
        rows = mixed.capture(batch, reqs)
        alone = {m: make(m).capture(batch, reqs) for m in ("subject_last", "target")}
        assert rows[0][0].shape[0] == len(reqs) < rows[1][0].shape[0]
        torch.testing.assert_close(rows[0][0], alone["subject_last"][0][0])
        torch.testing.assert_close(rows[1][0], alone["target"][1][0])
        with_p = mixed.normal_equations(batch, reqs)
        without = _with_spec(mixed.preserve, None, mixed.normal_equations, batch, reqs)
        torch.testing.assert_close(with_p[0][0], without[0][0])  # subject keys: no bank rows
        assert (with_p[1][0] - without[1][0]).norm() > 1e-3 * without[1][0].norm()
        assert all(s.norm() > 0 for s in mixed.weight_shifts(batch, reqs))
    loaded = load_editor(save_editor(mixed, tmp_path / "ed"), model=model, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert loaded.rows == ["subject_last", "target"] and loaded.layer_rows == ["subject_last", "target"]
    with pytest.raises(MetaEditError, match="rows lists 3 modes for 2 inner parameters"):
        make(["subject_last", "target", "target"])
    with pytest.raises(MetaEditError, match="rows must be one of"):
        make(["subject_last", "answers"])
    with pytest.raises(MetaEditError, match="preserve needs rows=target, answer or nonpad on some layer"):
        make(["subject_last", "subject"], preserve=spec)


def test_preserve_refuses_a_bad_setting(make_editor, tmp_path):
    with pytest.raises(MetaEditError, match="preserve.weight"):
        make_editor("malmen", "tiny-llama", preserve={"data": str(tmp_path), "weight": 0})
    with pytest.raises(MetaEditError, match="preserve: .*fields"):
        make_editor("malmen", "tiny-llama", preserve={"data": str(tmp_path), "wieght": 1})
    with pytest.raises(MetaEditError, match="preserve needs rows=target"):
        make_editor("malmen", "tiny-llama", rows="subject_last", preserve={"data": str(tmp_path)})
    ed = make_editor("malmen", "tiny-llama", preserve={"data": str(tmp_path / "none")})
    with pytest.raises(MetaEditError, match="no train.json"):
        ed.prepare()


def test_calibrate_gives_each_edit_the_smallest_scale_that_reaches_its_probability(make_editor):
    """calibrate p (edit time): edit i's value shifts are scaled by its own a_i in [1/16, calibrate_max], found by
    bisection so that its target just reaches mean token probability p; the shift is the per-layer
    solve of the same normal equations with DᵀK = Σ_i a_i D_iᵀK_i. One solve's value shifts reach the
    three targets unevenly (0.17 / 0.29 / 0.74 here); calibrated, the two overshot edits get smaller
    shifts, the short one a larger, and all three end near p; half the scales leave them short."""
    ed = make_editor("malmen", "tiny-gpt2", rows="target")
    reqs = requests(3)
    batch = ed.formatter.batch(*zip(*reqs))
    ed.train()
    ed.transform(ed.capture(batch))  # running statistics; the networks stay at their initial (identity)
    ed.eval()                        # map: each value shift is a gradient-descent step

    def probs(edited):
        return mean_target_logprob(forward_logits(ed.model, batch, edited.params), batch.targets).exp()

    with torch.no_grad():
        ed.edit_lrs.fill_(1e-2)
        free = probs(ed.shifted(ed.weight_shifts(batch)))
        assert float(free[0]) < 0.2 < float(free[1]) < float(free[2]), free
        ed.calibrate = 0.2
        edited = ed.apply_edits(batch, reqs)
        scales = ed.calibrated_scales
        assert scales is not None and float(scales[2]) < float(scales[1]) < 1 < float(scales[0]), scales
        got = probs(edited)
        assert bool(((got > 0.18) & (got < 0.25)).all()), got
        # The same solve with each edit's rows scaled: KᵀK unchanged, DᵀK = Σ_i a_i D_iᵀK_i.
        rows, owners = [], []
        for kd, _, _ in ed.key_value_rows(batch, reqs, owners=owners):
            rows.append(kd)

        def solved(a):
            out = []
            for i, lam in enumerate(ed.log_lambdas):
                owner = torch.cat([o[i] for o in owners])
                assert sorted(set(owner.tolist())) == [0, 1, 2]
                k, d = torch.cat([c[i][0] for c in rows]), torch.cat([c[i][1] for c in rows])
                out.append(solve_shift(*normal_terms(k, d * a[owner][:, None]), lam))
            return out

        for p, want in zip(ed.inner_params, solved(scales)):
            shift = ed.model.get_parameter(p.name) - edited.params[p.name]
            torch.testing.assert_close(shift.T if p.transposed else shift, want, rtol=1e-3, atol=1e-6)
        assert bool((probs(ed.shifted(solved(scales / 2))) < 0.2).all())
        # calibrate_max 1: only shrinks; the edit short of p at the networks' own scale keeps it.
        ed.calibrate_max = 1.0
        ed.apply_edits(batch, reqs)
        assert float(ed.calibrated_scales[0]) == 1.0 and bool((ed.calibrated_scales[1:] < 1).all()), ed.calibrated_scales
    with pytest.raises(MetaEditError, match="calibrate_max must be > 1/16"):
        make_editor("malmen", "tiny-gpt2", calibrate=0.5, calibrate_max=0.05)
    with pytest.raises(MetaEditError, match="calibrate must be a probability"):
        make_editor("malmen", "tiny-gpt2", calibrate=1.5)
    with pytest.raises(MetaEditError, match="calibrate needs solve=per_layer"):
        make_editor("malmen", "tiny-gpt2", rows="target", solve="joint", calibrate=0.5)
