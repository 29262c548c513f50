"""The one place where forward hooks are registered (removed on exit, whatever happens): capture
for MEND, capture and patching for locate-then-edit (metaedit/locate, metaedit/tracing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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


OutputFn = Callable[[Tensor], Tensor]


@contextmanager
def patched_outputs(patches: Mapping[nn.Module, OutputFn]) -> Iterator[None]:
    """Replace each module's output `y` by `fn(y)` during forward passes (locate-then-edit: corrupt
    embeddings, restore clean states, add an optimised delta at one token).

    Modules returning a tuple (attention: (output, weights)) have only the first element replaced.
    """

    def make_hook(fn: OutputFn):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        return hook

    handles = [m.register_forward_hook(make_hook(fn)) for m, fn in patches.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def captured(inputs: Mapping[str, nn.Module] | None = None, outputs: Mapping[str, nn.Module] | None = None,
             ) -> Iterator[dict[str, Tensor]]:
    """Record each module's first input (`inputs`) or output (`outputs`, first element of a tuple)
    under its key, as is (not detached: a caller may differentiate through it)."""
    store: dict[str, Tensor] = {}

    def in_hook(key: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            store[key] = args[0]

        return hook

    def out_hook(key: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            store[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [m.register_forward_pre_hook(in_hook(k)) for k, m in (inputs or {}).items()]
    handles += [m.register_forward_hook(out_hook(k)) for k, m in (outputs or {}).items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Stopped(Exception):
    """Raised by `forward_stops_after`'s hook; caught by the same context manager."""


@contextmanager
def forward_stops_after(module: nn.Module | None) -> Iterator[None]:
    """A forward run inside ends as soon as `module` has produced its output (None: runs whole).
    For reading activations of early blocks: the rest of the model, the output projection over
    the vocabulary included, is not computed. What was captured up to there stays captured."""
    if module is None:
        yield
        return

    def stop(mod: nn.Module, args: Any, output: Any) -> None:
        raise _Stopped

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _Stopped:
        pass
    finally:
        handle.remove()
