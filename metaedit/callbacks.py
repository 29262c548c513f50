"""Lightning callbacks: atomic last.ckpt and export of the best editor by validation loss."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from metaedit.editors.io import save_editor

log = logging.getLogger(__name__)


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear in one rename: a kill mid-write never corrupts last.ckpt."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero and os.path.exists(tmp):
            os.replace(tmp, filepath)
        self._last_checkpoint_saved = filepath
        trainer.strategy.barrier("atomic_checkpoint")


class SaveBestEditor(pl.Callback):
    """After each validation, write the editor to `<run_dir>/best` when `monitor` improved."""

    def __init__(self, run_dir: str | Path, monitor: str = "val/loss") -> None:
        self.run_dir, self.monitor = Path(run_dir), monitor
        self.best: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is not None and not value < self.best:
            return
        self.best = value
        if trainer.is_global_zero:
            save_editor(pl_module.editor, self.run_dir / "best")
            scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            (self.run_dir / "best" / "val_metrics.json").write_text(
                json.dumps({"global_step": trainer.global_step, **scores}, indent=1)
            )
            log.info("step %d: new best %s %.4f, editor saved to %s", trainer.global_step, self.monitor, value, self.run_dir / "best")
        trainer.strategy.barrier("save_best_editor")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class TimeBudget(pl.Callback):
    """A safety stop for a wall-clock budget that still leaves a selected editor.

    Training is meant to end by its step count (`trainer.max_steps`, the same amount of work on
    every machine). If the machine is too slow for that within `deadline` (a `time.monotonic()`
    value), training stops early enough that the validation Lightning runs on stopping (it
    validates when `should_stop` is set) also ends by then: the stop comes when the time left is
    less than the last validation took. `cut_at_step` records where the budget cut training short.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.val_seconds = 0.0
        self._val_start = 0.0
        self.cut_at_step: int | None = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_seconds = max(self.val_seconds, time.monotonic() - self._val_start)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.cut_at_step is None and time.monotonic() + self.val_seconds >= self.deadline:
            self.cut_at_step = trainer.global_step
            trainer.should_stop = True
            log.warning("time budget: stopping at step %d of %d (validating once more before the stop)",
                        trainer.global_step, trainer.max_steps)
