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

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.models.fingerprint import fingerprint
from metaedit.progress import Progress
from metaedit.types import EditBatch, EditRequest, MetaEditError, SequenceState
from metaedit.utils import save_tensors

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


class SequenceCheckpoint:
    """A long sequence saved part-way, so a killed run continues from its last save.

    One safetensors file (written to a temporary name, then renamed: a reader sees a whole file or
    none) holds the edited parameters, the editor's sequence state (AlphaEdit's K_p K_pᵀ) and, in
    its metadata, the steps done, their times and a key of what the sequence is (method,
    hyper-parameters, editor and base weights, requests, step size). A file with another key is not used:
    the sequence starts over and overwrites it.
    """

    FORMAT = "metaedit-sequence/1"

    def __init__(self, path: str | Path, every: int = 0) -> None:
        self.path = Path(path)
        self.every = every  # steps between saves; 0: about every 5 % of the sequence

    @staticmethod
    def key(editor: Editor, requests: Sequence[EditRequest], batch_size: int) -> str:
        # The editor's own weights too: a retrained editor with the same settings is another sequence.
        what = {"method": editor.method, "hparams": editor.hparams(), "base": fingerprint(editor.model),
                "editor": fingerprint(editor),
                "batch": batch_size, "requests": [asdict(r) for r in requests]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def load(self, key: str, device: torch.device) -> tuple[SequenceState, list[float]] | None:
        """The saved state and step times when the file holds this sequence; else None."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != self.FORMAT or meta.get("key") != key:
                    log.warning("%s was saved for another sequence (other edits, settings or base); "
                                "starting this one from its first step", self.path)
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            steps, times = int(meta["steps"]), [float(t) for t in json.loads(meta["times_ms"])]
        except (OSError, ValueError, KeyError) as e:  # safetensors reports a damaged file as OSError/ValueError
            log.warning("cannot read the saved sequence %s (%s); starting from the first step", self.path, e)
            return None
        part = {kind: {n.split("/", 1)[1]: t for n, t in tensors.items() if n.startswith(kind + "/")}
                for kind in ("params", "state")}
        return SequenceState(steps, part["params"], part["state"]), times

    def save(self, key: str, state: SequenceState, times_ms: list[float]) -> None:
        tensors = {f"params/{n}": t for n, t in state.params.items()}
        tensors.update({f"state/{n}": t for n, t in state.editor_state.items()})
        tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
        meta = {"format": self.FORMAT, "key": key, "steps": str(state.steps), "times_ms": json.dumps(times_ms)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, self.path, metadata=meta)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def apply_protocol(editor: Editor, batch: EditBatch, protocol: Protocol,
                   checkpoint: SequenceCheckpoint | None = None) -> tuple[EditedModel, float, int]:
    """The model edited with every edit of `batch` under `protocol`; also the mean milliseconds per
    step (one `apply_edits` call) and the number of steps.

    With `checkpoint`, a sequential run saves itself every few steps (and after its last step) and
    resumes from a save of the same sequence; the step times of a resumed run include the saved
    ones. The caller removes the file once the group is scored."""
    device = editor.device
    if protocol.name != "sequential":
        _sync(device)
        t0 = time.perf_counter()
        edited = editor.apply_edits(batch.edit, batch.requests)
        _sync(device)
        return edited, (time.perf_counter() - t0) * 1000, 1
    n_steps = -(-len(batch.requests) // protocol.batch)
    times: list[float] = []
    resume, key = None, None
    if checkpoint is not None and editor.resumable_sequences:
        key = SequenceCheckpoint.key(editor, batch.requests, protocol.batch)
        loaded = checkpoint.load(key, device)
        if loaded is not None:
            resume, times = loaded[0], loaded[1]
            log.info("%s: resuming the sequence after step %d of %d (%s)", editor.method, resume.steps, n_steps,
                     checkpoint.path)
    start = resume.steps if resume is not None else 0
    last = [time.perf_counter()]
    progress = Progress(n_steps, unit="step", noun=f"sequential steps of {protocol.batch}", start=start)
    every = max(1, n_steps // 20)  # a long sequence (1000 locate-then-edit edits: hours) says where it is
    save_every = (checkpoint.every if checkpoint is not None and checkpoint.every > 0 else every)

    def tick(k: int, current: EditedModel) -> None:
        _sync(device)
        times.append((time.perf_counter() - last[0]) * 1000)
        if n_steps >= 10 and ((k + 1) % every == 0 or k + 1 == n_steps):
            log.info("%s: %s", editor.method, progress.line(k + 1))
        if key is not None and ((k + 1) % save_every == 0 or k + 1 == n_steps):
            assert checkpoint is not None
            checkpoint.save(key, SequenceState(k + 1, dict(current.params), editor.sequence_state()), times)
        last[0] = time.perf_counter()  # the save is not part of the next step's time

    _sync(device)
    last[0] = time.perf_counter()
    edited = editor.edit_sequential(batch.requests, after_each=tick, batch_size=protocol.batch, resume=resume)
    return edited, sum(times) / max(1, len(times)), len(times)
