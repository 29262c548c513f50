"""Functional edits: run a base model with some parameters replaced, never mutating it."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaedit.types import LMBatch


def logits_of(output: Any) -> Tensor:
    """Logits as [batch, positions, classes]; a classifier's [batch, classes] gets one position."""
    logits = output.logits if hasattr(output, "logits") else output
    return logits.unsqueeze(1) if logits.dim() == 2 else logits


def forward_logits(model: nn.Module, batch: LMBatch, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """One forward pass; `params` (name -> tensor) replace the model's own for this call only.

    torch.func.functional_call swaps the tensors in and restores the originals in a finally block,
    so the graph flows into `params` (meta-training) while the base module stays untouched.
    """
    kwargs = batch.model_kwargs()
    with replay_prefix(model, batch, params or {}):
        if params:
            return logits_of(functional_call(model, dict(params), args=(), kwargs=kwargs, strict=False))
        return logits_of(model(**kwargs))


class _HeadReached(Exception):
    """Raised by `logits_at`'s hook to skip the output projection over every position."""


def logits_at(model: nn.Module, batch: LMBatch, rows: Tensor, cols: Tensor,
              params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Logits [n, vocab] at positions (rows[i], cols[i]) only: the forward stops at the output
    projection and applies it to the selected hidden states. Over a 49k vocabulary the projection of
    every position is a quarter of a small model's forward and backward; an optimisation that reads
    a few target tokens per row (ROME's value shift) needs only those. Falls back to the full
    forward when the model has no output embedding or `params` replaces it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
    if head is None or any(name in head_names for name in params or {}):
        return forward_logits(model, batch, params)[rows, cols]
    store: dict[str, Tensor] = {}

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        store["h"] = args[0]
        raise _HeadReached

    handle = head.register_forward_pre_hook(grab)
    try:
        forward_logits(model, batch, params)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    return head(store["h"][rows, cols])


def replay_prefix(model: nn.Module, batch: LMBatch, params: Mapping[str, Tensor]) -> AbstractContextManager[Any]:
    """Replay only the tail of the model when the batch carries its prefix and no overridden
    parameter lies before it; otherwise a no-op (the full forward runs)."""
    if batch.prefix is None:
        return nullcontext()
    from metaedit.prefix import runner_for

    runner = runner_for(model)
    if runner is None or not runner.covers(params):
        return nullcontext()
    return runner.replay(batch.prefix)


@contextmanager
def swapped_params(model: nn.Module, params: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily make `model` use `params` (for methods other than forward, e.g. `generate`).

    The original Parameter objects are put back in `finally`, so an exception cannot leave the base
    model edited.
    """
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, value in params.items():
            mod_name, _, pname = name.rpartition(".")
            module = model.get_submodule(mod_name)
            saved.append((module, pname, module._parameters[pname]))  # type: ignore[arg-type]
            del module._parameters[pname]
            setattr(module, pname, value)
        yield model
    finally:
        for module, pname, original in reversed(saved):
            if pname in module.__dict__:
                delattr(module, pname)
            module._parameters[pname] = original


class EditedModel(nn.Module):
    """The base model seen through edited parameters; usable like the base (forward, generate).

    The base is held without registering it as a submodule, so this object never copies or owns
    base weights; `merged()` returns a standalone copy when one is wanted.
    """

    def __init__(self, base: nn.Module, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)
        self.params: dict[str, Tensor] = dict(params)

    @property
    def config(self) -> Any:
        return getattr(self.base, "config", None)

    def logits(self, batch: LMBatch) -> Tensor:
        return forward_logits(self.base, batch, self.params)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.params, args=args, kwargs=kwargs, strict=False)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), swapped_params(self.base, self.params):
            return self.base.generate(*args, **kwargs)  # type: ignore[operator]

    def detached(self) -> EditedModel:
        return EditedModel(self.base, {k: v.detach() for k, v in self.params.items()})

    def save_pretrained(self, directory: str, tokenizer: Any | None = None) -> None:
        """A normal transformers checkpoint of the edited model (loadable without metaedit)."""
        self.merged().save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def merged(self) -> nn.Module:
        """A deep copy of the base model with the edit written into its weights."""
        with swapped_params(self.base, {}):
            clone = copy.deepcopy(self.base)
        with torch.no_grad():
            for name, value in self.params.items():
                clone.get_parameter(name).copy_(value)
        return clone
