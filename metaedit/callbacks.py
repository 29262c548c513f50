"""Lightning callbacks: atomic last.ckpt, export of the best editor by validation loss, progress lines."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from metaedit.editors.io import save_editor
from metaedit.progress import Progress, format_duration

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


class ProgressLog(pl.Callback):
    """Training progress as `logging` lines, which reach Hydra's log file and any terminal (the
    progress bar only draws in an interactive one): every `every_n_steps` optimizer steps, after each
    validation, and at each quarter of a validation that runs longer than `long_validation_s`."""

    def __init__(self, every_n_steps: int = 25, long_validation_s: float = 10.0) -> None:
        self.every_n_steps, self.long_validation_s = every_n_steps, long_validation_s
        self._train: Progress | None = None
        self._val: Progress | None = None
        self._val_every, self._val_next = 1, 1
        self._last_step = -1
        self._val_loss: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Counted from the step training (re)starts at, so a resumed run's rate is its own.
        self._train = Progress(trainer.max_steps, start=trainer.global_step)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps: it stays put on accumulation and skipped non-finite steps.
        if self._train is None or step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        loss = trainer.callback_metrics.get("train/loss")
        scores = (f" train/loss {float(loss):.4f}" if loss is not None else "") + (
            f" val/loss {self._val_loss:.4f}" if self._val_loss is not None else "")
        # The editor's summary state (Editor.state_to_log names without a "/"): one host sync per line.
        scores += "".join(f" {k[len('train/'):]} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                          if k.startswith("train/state/") and "/" not in k[len("train/state/"):])
        log.info("step %s%s", self._train.line(step), scores)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        n = sum(trainer.num_val_batches)
        total = int(n) if math.isfinite(n) else None
        self._val = Progress(total, unit="batch", noun="batches")
        # Quarter marks; none when the number of batches is unknown (an iterable dataset).
        self._val_every = self._val_next = math.ceil(total / 4) if total else 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val is None or not self._val_every or trainer.sanity_checking or batch_idx + 1 < self._val_next:
            return
        self._val_next += self._val_every
        if trainer.is_global_zero and self._val.seconds() >= self.long_validation_s and batch_idx + 1 < (self._val.total or 0):
            log.info("validation at step %d: %s", trainer.global_step, self._val.line(batch_idx + 1))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val is None or trainer.sanity_checking:
            return
        scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._val_loss = scores.get("val/loss", self._val_loss)
        if trainer.is_global_zero:
            log.info("validation at step %d (%s): %s", trainer.global_step, format_duration(self._val.seconds()),
                     " ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())) or "no val/ metrics")
        self._val = None


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
