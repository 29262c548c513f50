"""Which parameters an editor may change: module-name pattern + layer indices, per architecture."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from metaedit.types import MetaEditError

# Default groups per transformers `model_type`. `container` is the ModuleList of blocks; `pattern`
# must fullmatch a module name relative to one block; `side` says whether the layer sits on the
# input (encoder) or output (decoder/causal) stream, where target positions are defined.
DEFAULT_SPECS: dict[str, list[dict[str, Any]]] = {
    "gpt2": [{"container": "transformer.h", "layers": [-3, -2, -1], "pattern": r"mlp\.(c_fc|c_proj)"}],
    "gptj": [{"container": "transformer.h", "layers": [-3, -2, -1], "pattern": r"mlp\.(fc_in|fc_out)"}],
    "llama": [
        {"container": "model.layers", "layers": [-3, -2, -1], "pattern": r"mlp\.(gate_proj|up_proj|down_proj)"}
    ],
    "t5": [
        {
            "container": "encoder.block",
            "layers": [-2, -1],
            "pattern": r"layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)",
            "side": "input",
        },
        {"container": "decoder.block", "layers": [-2, -1], "pattern": r"layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)"},
    ],
    "bart": [
        {"container": "model.encoder.layers", "layers": [-2, -1], "pattern": r"fc1|fc2", "side": "input"},
        {"container": "model.decoder.layers", "layers": [-2, -1], "pattern": r"fc1|fc2"},
    ],
    "bert": [
        {
            "container": "bert.encoder.layer",
            "layers": [-3, -2, -1],
            "pattern": r"intermediate\.dense|output\.dense",
            "side": "input",
        }
    ],
}


@dataclass(frozen=True)
class InnerParam:
    """One editable weight matrix. `transposed` is True for GPT-2's Conv1D, which stores W as [in, out]."""

    name: str  # parameter name, e.g. "transformer.h.3.mlp.c_fc.weight"
    module_name: str
    d_in: int
    d_out: int
    transposed: bool
    side: str  # "input" (encoder stream) or "output"


def _linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    # Dispatch on module type, never on model class names: Conv1D is y = x W + b with W [in, out].
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    return None


def resolve_inner_params(model: nn.Module, spec: Sequence[Mapping[str, Any]] | None) -> list[InnerParam]:
    """Resolve a spec (or the architecture's default) to concrete parameters, with clear errors."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None:
        if model_type not in DEFAULT_SPECS:
            raise MetaEditError(
                f"no default inner-param spec for model_type {model_type!r}; give model.inner_params "
                f"(known defaults: {sorted(DEFAULT_SPECS)})"
            )
        spec = DEFAULT_SPECS[model_type]
    out: list[InnerParam] = []
    for g, group in enumerate(spec):
        container_name = group["container"]
        try:
            container = model.get_submodule(container_name)
        except AttributeError:
            raise MetaEditError(f"inner_params group {g}: model has no module {container_name!r}") from None
        if not isinstance(container, nn.ModuleList):
            raise MetaEditError(f"inner_params group {g}: {container_name!r} is not a list of blocks")
        n = len(container)
        layers = _group_layers(group, g, n, container_name)
        pattern = re.compile(group["pattern"])
        found = 0
        for i in layers:
            for rel, module in container[i].named_modules():
                if not rel or not pattern.fullmatch(rel):
                    continue
                dims = _linear_dims(module)
                if dims is None:
                    raise MetaEditError(
                        f"inner_params: {container_name}.{i}.{rel} matches {group['pattern']!r} but is a "
                        f"{type(module).__name__}, not a Linear/Conv1D layer"
                    )
                full = f"{container_name}.{i}.{rel}"
                out.append(InnerParam(f"{full}.weight", full, dims[0], dims[1], dims[2], group.get("side", "output")))
                found += 1
        if found == 0:
            raise MetaEditError(
                f"inner_params group {g}: pattern {group['pattern']!r} matches no Linear/Conv1D module in "
                f"{container_name} layers {layers}"
            )
    return out


def _group_layers(group: Mapping[str, Any], g: int, n: int, container_name: str) -> list[int]:
    """Block indices of a group: `layers` (indices, negative from the end) or `depth: [lo, hi]`:
    the blocks whose relative position i/n lies in the half-open range [lo, hi) (at least one): a recipe found on one
    model (e.g. the early-middle MLPs of a 30-block Llama) then resolves on a shallower one of the
    same family."""
    if ("layers" in group) == ("depth" in group):
        raise MetaEditError(f"inner_params group {g}: give exactly one of 'layers' (indices) or 'depth' ([lo, hi) fractions)")
    if "depth" in group:
        try:
            lo, hi = (float(x) for x in group["depth"])
        except (TypeError, ValueError):
            raise MetaEditError(f"inner_params group {g}: depth must be two fractions [lo, hi), got {group['depth']!r}") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise MetaEditError(f"inner_params group {g}: depth [{lo}, {hi}) must satisfy 0 <= lo < hi <= 1")
        first = min(int(math.ceil(lo * n)), n - 1)
        return list(range(first, max(first + 1, int(math.ceil(hi * n)))))
    for idx in group["layers"]:
        if not -n <= idx < n:
            raise MetaEditError(f"inner_params group {g}: layer {idx} out of range for {n} blocks in {container_name}")
    return sorted({i % n for i in group["layers"]})
