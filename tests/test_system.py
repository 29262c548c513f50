"""The generic outer loop: non-finite steps are skipped (no update) and abort after a limit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

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
