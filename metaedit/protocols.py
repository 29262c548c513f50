"""Evaluation protocols (DESIGN §3): how a group of edits reaches the model before it is scored.

- single: each edit applied alone to the unedited model;
- batch n=N: N edits applied together in one `apply_edits`;
- sequential n=N batch=B: N edits applied B at a time, each step to the model already edited by the
  previous ones (`Editor.edit_sequential`); the group is scored after the last step, on all N edits,
  so an early edit that later ones overwrote counts as a failure.

Locality is always measured against the unedited model (the scoring code asks the editor for base
logits outside any sequence).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.progress import Progress
from metaedit.types import EditBatch, MetaEditError

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "batch", "sequential")


@dataclass(frozen=True)
class Protocol:
    """`n`: edits per scored group (1 for single); `batch`: edits per step of a sequence."""

    name: str = "single"
    n: int = 1
    batch: int = 1

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise MetaEditError(f"unknown protocol {self.name!r}; valid: {list(PROTOCOLS)}")
        if self.n < 1 or self.batch < 1:
            raise MetaEditError(f"protocol {self.name}: n and batch must be >= 1, got n={self.n} batch={self.batch}")
        if self.name == "single" and self.n != 1:
            raise MetaEditError(f"protocol=single applies one edit at a time (n=1); for {self.n} together use protocol=batch")
        if self.name == "sequential" and self.batch > self.n:
            raise MetaEditError(f"protocol=sequential: batch={self.batch} is more than the n={self.n} edits of a sequence")

    @classmethod
    def together(cls, n_edits: int) -> Protocol:
        """What a group of `n_edits` edits applied together is (single when one)."""
        return cls("single") if n_edits == 1 else cls("batch", n=n_edits)

    @property
    def step(self) -> int:
        """Edits per `apply_edits` call."""
        return self.batch if self.name == "sequential" else self.n

    def describe(self) -> str:
        if self.name == "single":
            return "one at a time"
        if self.name == "batch":
            return f"{self.n} at a time (protocol=batch n={self.n})"
        return (f"in sequences of {self.n}, {self.batch} per step, scored after the last step "
                f"(protocol=sequential n={self.n} batch={self.batch})")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apply_protocol(editor: Editor, batch: EditBatch, protocol: Protocol) -> tuple[EditedModel, float, int]:
    """The model edited with every edit of `batch` under `protocol`; also the mean milliseconds per
    step (one `apply_edits` call) and the number of steps."""
    device = editor.device
    if protocol.name != "sequential":
        _sync(device)
        t0 = time.perf_counter()
        edited = editor.apply_edits(batch.edit, batch.requests)
        _sync(device)
        return edited, (time.perf_counter() - t0) * 1000, 1
    times: list[float] = []
    last = [time.perf_counter()]
    n_steps = -(-len(batch.requests) // protocol.batch)
    progress = Progress(n_steps, unit="step", noun=f"sequential steps of {protocol.batch}")
    every = max(1, n_steps // 20)  # a long sequence (1000 locate-then-edit edits: hours) says where it is

    def tick(k: int, current: EditedModel) -> None:
        _sync(device)
        now = time.perf_counter()
        times.append((now - last[0]) * 1000)
        last[0] = now
        if n_steps >= 10 and ((k + 1) % every == 0 or k + 1 == n_steps):
            log.info("%s: %s", editor.method, progress.line(k + 1))

    _sync(device)
    last[0] = time.perf_counter()
    edited = editor.edit_sequential(batch.requests, after_each=tick, batch_size=protocol.batch)
    return edited, sum(times) / max(1, len(times)), len(times)
