"""The wall-clock budget is a safety stop that still validates (so an editor is selected)."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from metaedit.callbacks import TimeBudget


class _Slow(pl.LightningModule):
    """A real LightningModule whose steps take a known time, counting its validations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return self.w(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(0.05)

    def on_validation_epoch_end(self) -> None:
        self.validated_at.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=4)


def test_time_budget_stops_early_and_validates_before_stopping():
    module, budget = _Slow(), TimeBudget(deadline=time.monotonic() + 1.0)
    trainer = pl.Trainer(max_steps=10_000, val_check_interval=5_000, check_val_every_n_epoch=None, limit_val_batches=2,
                         callbacks=[budget], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.monotonic()
    trainer.fit(module, _loader(), _loader())
    assert budget.cut_at_step is not None and 0 < budget.cut_at_step < 10_000
    # the stop was followed by one validation at the step where the budget cut training short
    assert module.validated_at == [budget.cut_at_step]
    assert time.monotonic() - t0 < 3.0


def test_time_budget_does_not_interfere_when_steps_end_first():
    module, budget = _Slow(), TimeBudget(deadline=time.monotonic() + 60.0)
    trainer = pl.Trainer(max_steps=6, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1,
                         callbacks=[budget], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, _loader(), _loader())
    assert budget.cut_at_step is None and trainer.global_step == 6 and module.validated_at == [3, 6]
