"""Frozen-prefix replay: run the blocks *before* the first edited block once, then only the tail.

Every editor changes parameters of blocks L0..L-1 only (the inner params), so for a decoder-only
model the hidden state entering block L0 is the same before and after any edit. Computing it once
per input and replaying only blocks L0.. (+ final norm and head) makes every post-edit forward, every
fine-tuning step and every meta-training step several times cheaper on deep models (SmolLM2: 3 of 30
blocks). The replay is exact, and checked to be on each model before it is used: blocks before L0
are swapped for pass-throughs and a pre-hook on block L0 feeds it the cached state. Where the check
fails (an architecture whose blocks are not called as `block(hidden_states, ...) -> hidden_states`,
encoder-decoders) the model simply runs in full.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from metaedit.types import LMBatch


class _PassThrough(nn.Module):
    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


class _Stop(Exception):
    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_of(model: nn.Module, name: str) -> tuple[str, int] | None:
    """('model.layers', 27) for 'model.layers.27.mlp.up_proj.weight' (the ModuleList and index)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            parent = ".".join(parts[:i])
            try:
                if isinstance(model.get_submodule(parent), nn.ModuleList):
                    return parent, int(parts[i])
            except AttributeError:
                return None
    return None


class FrozenPrefix:
    """Computes / replays the hidden state entering block `start` of the ModuleList `blocks`."""

    def __init__(self, model: nn.Module, blocks: str, start: int) -> None:
        self.model, self.blocks_name, self.start = model, blocks, start
        self.blocks: nn.ModuleList = model.get_submodule(blocks)  # type: ignore[assignment]

    @torch.no_grad()
    def hidden(self, batch: LMBatch) -> Tensor:
        """Input of block `start` for every row: a forward that stops there (nothing after it runs)."""

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _Stop(_hidden_arg(args, kwargs))

        handle = self.blocks[self.start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**batch.model_kwargs())
        except _Stop as s:
            return s.hidden.detach()
        finally:
            handle.remove()
        raise RuntimeError("the prefix forward never reached the first edited block")

    @contextmanager
    def replay(self, hidden: Tensor) -> Iterator[None]:
        """Within the context, a forward of the model skips blocks < start and feeds `hidden` to block start."""
        saved = [self.blocks[i] for i in range(self.start)]

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.blocks[self.start].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i in range(self.start):
                self.blocks[i] = _PassThrough()
            yield
        finally:
            handle.remove()
            for i, block in enumerate(saved):
                self.blocks[i] = block

    def covers(self, names: Iterable[str]) -> bool:
        """True when every overridden parameter lies in a block >= start (else replay would be wrong)."""
        for n in names:
            where = _block_of(self.model, n)
            if where is None or where[0] != self.blocks_name or where[1] < self.start:
                return False
        return True


_RUNNERS: weakref.WeakKeyDictionary[nn.Module, FrozenPrefix | None] = weakref.WeakKeyDictionary()


@torch.no_grad()
def frozen_prefix(model: nn.Module, param_names: Iterable[str]) -> FrozenPrefix | None:
    """The replay runner for a model whose edits touch `param_names`, or None when replay does not
    apply or does not reproduce the full forward exactly on this model (checked once per model)."""
    names = list(param_names)
    places = [_block_of(model, n) for n in names]
    if not names or any(p is None for p in places) or len({p[0] for p in places}) != 1:  # type: ignore[index]
        return None
    blocks, start = places[0][0], min(p[1] for p in places)  # type: ignore[index]
    cached = _RUNNERS.get(model)
    if cached is not None and cached.blocks_name == blocks and cached.start <= start:
        return cached
    if model in _RUNNERS and cached is None:
        return None
    runner: FrozenPrefix | None = FrozenPrefix(model, blocks, start)
    if start == 0 or getattr(model.config, "is_encoder_decoder", False):
        runner = None
    else:
        try:
            vocab = int(getattr(model.config, "vocab_size", 100))
            ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
            probe = LMBatch(ids.to(next(model.parameters()).device), torch.ones_like(ids).to(next(model.parameters()).device),
                            torch.full_like(ids, -100), torch.ones_like(ids))
            full = model(**probe.model_kwargs()).logits
            with runner.replay(runner.hidden(probe)):  # type: ignore[union-attr]
                fast = model(**probe.model_kwargs()).logits
            if not torch.allclose(full, fast, atol=1e-4, rtol=1e-4):
                runner = None
        except Exception:  # an architecture the replay does not fit: run in full instead
            runner = None
    _RUNNERS[model] = runner
    return runner


def runner_for(model: nn.Module) -> FrozenPrefix | None:
    """The runner already set up for `model` by `frozen_prefix`, if any."""
    return _RUNNERS.get(model)


class PrefixCache:
    """Prefix hidden states keyed by a row's token ids, reused across steps and epochs (the base is
    frozen, so an input's prefix never changes). Rows are stored unpadded."""

    def __init__(self, runner: FrozenPrefix, max_rows: int = 200_000) -> None:
        self.runner, self.max_rows = runner, max_rows
        self.rows: dict[tuple[int, ...], Tensor] = {}

    def attach(self, batch: LMBatch) -> LMBatch:
        lengths = batch.attention_mask.sum(-1).tolist()
        keys = [tuple(batch.input_ids[i, : int(n)].tolist()) for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        if missing:
            sub = replace(batch, input_ids=batch.input_ids[missing], attention_mask=batch.attention_mask[missing])
            hidden = self.runner.hidden(sub)
            for j, i in enumerate(missing):
                if len(self.rows) < self.max_rows:
                    self.rows[keys[i]] = hidden[j, : int(lengths[i])]
                else:
                    return with_prefix(self.runner, batch)  # cache full: compute, do not store
        width = batch.input_ids.shape[1]
        out = torch.stack([nn.functional.pad(self.rows[k], (0, 0, 0, width - len(k))) for k in keys])
        return replace(batch, prefix=out)


def with_prefix(runner: FrozenPrefix | None, batch: LMBatch) -> LMBatch:
    """`batch` carrying its prefix hidden states (unchanged when replay does not apply)."""
    if runner is None or batch.prefix is not None:
        return batch
    return replace(batch, prefix=runner.hidden(batch))


def with_prefixes(runner: FrozenPrefix | None, batches: Sequence[LMBatch]) -> list[LMBatch]:
    """`with_prefix` for several batches in ONE prefix forward (rows stacked, right-padded): a few
    larger matmuls instead of one small prefix pass per batch. Right padding leaves every real
    position's hidden state unchanged, so batch i's prefix is its rows and its own width."""
    todo = [i for i, b in enumerate(batches) if b.prefix is None]
    out = list(batches)
    if runner is None or not todo:
        return out
    hidden = runner.hidden(LMBatch.concat([batches[i] for i in todo]))
    start = 0
    for i in todo:
        b = batches[i]
        out[i] = replace(b, prefix=hidden[start : start + len(b), : b.width])
        start += len(b)
    return out
