"""The generic outer loop: non-finite steps are skipped (no update) and abort after a limit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch

from metaedit.functional import EditedModel
from metaedit.losses import mean_target_logprob
from metaedit.metrics import first_token_margins, outer_losses
from metaedit.system import EditorSystem


def test_nonfinite_steps_are_skipped_then_abort(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    with torch.no_grad():
        ed.edit_lrs.fill_(float("nan"))  # every edited weight, hence every loss, is NaN
    before = {k: v.clone() for k, v in ed.state_dict().items() if "norms" not in k}
    system = EditorSystem(ed, max_nonfinite=3)
    data = make_data(ed.formatter, n_edits=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        trainer.fit(system, datamodule=data)
    assert system.nonfinite_total == 3
    for k, v in before.items():  # skipped steps left the editor (and Adam) untouched
        assert torch.equal(v, ed.state_dict()[k]) or torch.isnan(v).all(), k


def test_a_few_steps_train_the_editor_and_not_the_base(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    base = {k: v.clone() for k, v in ed.model.state_dict().items()}
    net = next(iter(ed.nets.values()))
    up_before = net.up[0].detach().clone()
    system = EditorSystem(ed, lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    assert not torch.equal(up_before, net.up[0])  # zero-initialised blocks do learn
    assert all(torch.equal(v, ed.model.state_dict()[k]) for k, v in base.items())
    assert not ed.model.training  # the base stays in eval mode during meta-training


def test_forward_backward_reaches_the_editor_and_keeps_nothing(make_editor, make_data):
    """What precision=auto times: the real outer loss and its backward into the editor's networks, with
    no gradient, buffer (MEND's running norms) or base weight changed afterwards."""
    ed = make_editor("mend", "tiny-gpt2")
    ed.train()
    before = {k: v.clone() for k, v in ed.state_dict().items()}
    reached: list[bool] = []
    ed.edit_lrs.register_hook(lambda grad: reached.append(bool(grad.abs().sum() > 0)))
    EditorSystem(ed).forward_backward(_train_batch(ed, make_data))
    assert reached == [True]
    assert all(p.grad is None for p in ed.parameters())
    assert all(torch.equal(v, ed.state_dict()[k]) for k, v in before.items())


def _train_batch(ed, make_data):
    data = make_data(ed.formatter, n_edits=2, loc_per_edit=3)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_neighbour_margin_loss_charges_the_margin_an_edit_takes_away(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    batch = _train_batch(ed, make_data)
    assert batch.loc_new is not None and len(batch.loc_new) == len(batch.loc)  # training batches carry it
    base = {p.name: ed.model.get_parameter(p.name) for p in ed.inner_params}
    untouched = outer_losses(ed, batch, EditedModel(ed.model, base), margin=True)
    assert untouched.margin is not None and float(untouched.margin) == 0.0  # no edit, no margin lost
    assert outer_losses(ed, batch, EditedModel(ed.model, base)).margin is None  # only when asked for

    with torch.no_grad():
        ed.edit_lrs.fill_(1.0)  # a step far too large: the new targets gain on every prompt, neighbours too
    out = outer_losses(ed, batch, margin=True)

    def margins(model) -> torch.Tensor:  # the metric's comparison, from plain forwards of each model
        with torch.no_grad():
            return (mean_target_logprob(model.logits(batch.loc), batch.loc.targets)
                    - mean_target_logprob(model.logits(batch.loc_new), batch.loc_new.targets))

    pre, post = margins(EditedModel(ed.model, base)), margins(out.edited)
    assert (post < pre).any()
    assert torch.allclose(out.margin.detach(), torch.relu(pre - post).mean(), atol=1e-5)
    out.margin.backward()  # the loss reaches the editor's networks (what meta-training updates)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ed.nets.parameters())


def test_first_token_margin_reads_both_answers_from_the_neighbours_own_rows(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    batch = _train_batch(ed, make_data)
    with torch.no_grad():
        ed.edit_lrs.fill_(1.0)
    out = outer_losses(ed, batch, margin=True, first_token=True)
    base = EditedModel(ed.model, {p.name: ed.model.get_parameter(p.name) for p in ed.inner_params})

    def margins(model) -> torch.Tensor:  # from the first answer token of each row's own forward
        with torch.no_grad():
            own, new = model.logits(batch.loc).log_softmax(-1), model.logits(batch.loc_new).log_softmax(-1)
        first = lambda t: (t != -100).int().argmax(-1)  # noqa: E731
        rows = torch.arange(len(batch.loc))
        own_tok, new_tok = batch.loc.targets[rows, first(batch.loc.targets)], batch.loc_new.targets[rows, first(batch.loc_new.targets)]
        # the new target's first token is predicted at the same place in the neighbour's row as in its loc_new row
        assert torch.allclose(own[rows, first(batch.loc.targets), new_tok],
                              new[rows, first(batch.loc_new.targets), new_tok], atol=1e-4)
        return own[rows, first(batch.loc.targets), own_tok] - own[rows, first(batch.loc.targets), new_tok]

    pre, post = margins(base), margins(out.edited)
    assert (post < pre).any()
    assert torch.allclose(out.margin.detach(), torch.relu(pre - post).mean(), atol=1e-5)
    assert torch.allclose(out.margin.detach(), torch.relu(first_token_margins(base.logits(batch.loc), batch.loc, batch.loc_new)
                                                          - post).mean(), atol=1e-5)
    out.margin.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ed.nets.parameters())

    # The training step takes this margin without ever running the neighbours with the new target:
    # with token ids no embedding has, any forward of loc_new would fail.
    poisoned = replace(batch, loc_new=replace(batch.loc_new, input_ids=torch.full_like(batch.loc_new.input_ids, 10**6)))
    def system(**kw) -> EditorSystem:  # outside a Trainer: a plain backward instead of Lightning's
        s = EditorSystem(ed, c_ns=1.0, **kw)
        s._backward = lambda loss, check=None: loss.backward()  # type: ignore[method-assign]
        return s

    logs, _ = system(margin_first_token=True).outer_step(poisoned)
    assert float(logs["loss_margin"]) > 0
    with pytest.raises(IndexError):
        system().outer_step(poisoned)


def test_c_ns_adds_the_weighted_margin_loss_to_the_objective(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    with torch.no_grad():
        ed.edit_lrs.fill_(1.0)
    ed.eval()  # MEND's running normalisers move in training mode: both objectives must see the same editor
    batch = _train_batch(ed, make_data)
    plain, plain_logs = EditorSystem(ed)._objective(batch)
    weighted, logs = EditorSystem(ed, c_ns=2.0)._objective(batch)
    assert "loss_margin" not in plain_logs and float(logs["loss_margin"]) > 0
    assert torch.allclose(weighted, plain + 2.0 * logs["loss_margin"], atol=1e-5)
    with pytest.raises(ValueError, match="c_ns"):
        EditorSystem(ed, c_ns=-1.0)


def test_training_steps_with_the_margin_loss_log_it_and_train_the_editor(make_editor, make_data):
    ed = make_editor("mend", "tiny-gpt2")
    net = next(iter(ed.nets.values()))
    up_before = net.up[0].detach().clone()
    system = EditorSystem(ed, lr=1e-3, c_ns=1.0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    assert "train/loss_margin" in trainer.callback_metrics  # the term went through the trainer's step
    assert not torch.equal(up_before, net.up[0])


def test_inscope_margin_loss_charges_rephrases_where_the_true_object_still_wins(make_editor, make_data):
    """c_es: relu(κ − [log P(new) − log P(true)]) on each rephrase's first target token, read from its own
    row; zero where the new object already leads by κ, larger the more the true one leads; a row whose
    objects start alike adds nothing; the weighted term enters the objective; no true objects: refused."""
    from metaedit.metrics import inscope_margin_loss

    ed = make_editor("mend", "tiny-gpt2")
    batch = _train_batch(ed, make_data)
    assert batch.inscope_true is not None and len(batch.inscope_true) == len(batch.inscope)  # training carries it
    rows = torch.arange(len(batch.inscope))
    start = (batch.inscope.targets != -100).int().argmax(-1)
    new = batch.inscope.targets[rows, start]
    true = batch.inscope_true.targets[rows, (batch.inscope_true.targets != -100).int().argmax(-1)]
    differ = new != true
    assert differ.any()
    logits = torch.zeros(*batch.inscope.targets.shape, len(ed.formatter.tokenizer))
    logits[rows, start, new] = 5.0  # the new object's first token leads by 5 nats everywhere
    assert float(inscope_margin_loss(logits, batch, margin=1.0)) == 0.0
    logits[rows, start, true] = 5.0 + 2.0 * differ  # ... now the true one leads by 2 where they differ
    expected = (3.0 * differ).sum() / len(rows)  # relu(1 − (−2)) on those rows, 0 on the others
    assert torch.allclose(inscope_margin_loss(logits, batch, margin=1.0), expected)

    with torch.no_grad():
        ed.edit_lrs.fill_(1.0)
    ed.eval()  # MEND's running normalisers move in training mode: both objectives must see the same editor
    plain, plain_logs = EditorSystem(ed)._objective(batch)
    weighted, logs = EditorSystem(ed, c_es=2.0, es_margin=3.0)._objective(batch)
    assert "loss_es_margin" not in plain_logs and float(logs["loss_es_margin"]) > 0
    assert torch.allclose(weighted, plain + 2.0 * logs["loss_es_margin"], atol=1e-5)
    with pytest.raises(ValueError, match="target_true"):
        EditorSystem(ed, c_es=1.0)._objective(replace(batch, inscope_true=None))
    with pytest.raises(ValueError, match="c_es"):
        EditorSystem(ed, c_es=-1.0)


def test_whole_object_inscope_margin_compares_what_es_compares(make_editor, make_data):
    """es_first_token false: the margin is mean log P(new object) − mean log P(true object) per rephrase —
    the same comparison CounterFact's es / ps count — from the rephrases run with the true object in the
    same forward; it charges a row whose first tokens already favour the new object when the whole
    objects do not, and it goes through a training step with frozen-prefix replay."""
    from metaedit.metrics import inscope_margin_loss

    ed = make_editor("mend", "tiny-gpt2")
    batch = _train_batch(ed, make_data)
    assert batch.inscope_true is not None
    base = {p.name: ed.model.get_parameter(p.name) for p in ed.inner_params}
    terms = outer_losses(ed, batch, EditedModel(ed.model, base), inscope_true=True)
    assert terms.post_true is not None and outer_losses(ed, batch, EditedModel(ed.model, base)).post_true is None
    with torch.no_grad():
        m = (mean_target_logprob(ed.base_logits(batch.inscope), batch.inscope.targets)
             - mean_target_logprob(ed.base_logits(batch.inscope_true), batch.inscope_true.targets))
    assert torch.allclose(inscope_margin_loss(terms.post_in, batch, 2.0, terms.post_true), torch.relu(2.0 - m).mean(),
                          atol=1e-5)

    # Constructed logits: each new object's first token leads by 5 nats (the first-token margin is
    # satisfied) but its later tokens are unlikely, while the true object is certain at every token.
    vocab = len(ed.formatter.tokenizer)
    new_t, true_t = batch.inscope.targets, batch.inscope_true.targets
    post_in = torch.zeros(*new_t.shape, vocab)
    post_true = torch.zeros(*true_t.shape, vocab)
    rows = torch.arange(len(new_t))
    start = (new_t != -100).int().argmax(-1)
    post_in[rows, start, new_t[rows, start]] = 5.0
    tpos = (true_t != -100).nonzero(as_tuple=True)
    post_true[tpos[0], tpos[1], true_t[tpos]] = 30.0
    multi = (new_t != -100).sum(-1) > 1
    assert multi.any()  # the tiny data has multi-token objects
    whole = inscope_margin_loss(post_in, batch, 1.0, post_true)
    assert float(whole) > 0 and float(inscope_margin_loss(post_in, batch, 1.0)) < float(whole)

    system = EditorSystem(ed, lr=1e-3, c_es=1.0, es_first_token=False)
    assert system.prefix is not None  # the true-object rows take the replayed prefix like the others
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    assert float(trainer.callback_metrics["train/loss_es_margin"]) > 0


class _LearningRates(pl.Callback):
    """The learning rate each optimizer step runs with, and the one left after the last."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_warms_up_then_follows_the_schedule_to_max_steps(make_editor, make_data, schedule):
    ed = make_editor("mend", "tiny-gpt2")
    lrs = _LearningRates()
    system = EditorSystem(ed, lr=1e-3, schedule=schedule, warmup_steps=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, inference_mode=False, callbacks=[lrs])
    trainer.fit(system, datamodule=make_data(ed.formatter, n_edits=2))
    seen = lrs.seen
    assert len(seen) == 7 and seen[0] < seen[1]  # six steps; the first at a warm-up fraction of lr
    if schedule == "constant":
        assert seen[1:] == [pytest.approx(1e-3)] * 6
    else:  # decays every step after warm-up, to 5 % of lr at max_steps (the cosine runs' last steps)
        assert all(a > b for a, b in zip(seen[1:], seen[2:])), seen
        assert seen[1] <= 1e-3 and seen[-1] == pytest.approx(0.05e-3)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(seen[-1])  # logged with the step
