"""The one place where forward hooks are registered (removed on exit, whatever happens)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


@contextmanager
def capture_layer_io(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Record (input u, output y) of each module during a forward pass.

    Outputs are returned so the caller can differentiate a loss w.r.t. them (δ = ∂L/∂y). When an
    output does not require grad (the base is frozen and nothing upstream is trainable), it is
    replaced by a detached leaf that does: gradients then flow from the loss down to the earliest
    captured layer and stop there — no backward pass into the rest of the network.
    """
    store: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            store[name] = (args[0].detach(), output)
            return output

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
