"""Editor behaviour: MEND's gradient capture is exact, edits change predictions, the base is untouched."""

from __future__ import annotations

import pytest
import torch

from metaedit.data.synthetic import build_world
from metaedit.functional import forward_logits
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
