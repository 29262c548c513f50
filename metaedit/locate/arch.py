"""Where a transformer's blocks, MLPs and attention sit, per architecture.

Locate-then-edit treats the MLP's output projection W_out (y = W_out k) as a linear associative
memory: its input k (the "key", after the non-linearity / gating) indexes a fact, its output is
the value written into the residual stream. Tables are keyed by transformers `model_type`, as the
inner-param defaults are; weights are read in [d_out, d_in] orientation through `weight_out_in`,
which dispatches on module type (GPT-2's Conv1D stores W transposed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from metaedit.models.inner_params import InnerParam, resolve_inner_params
from metaedit.types import MetaEditError


@dataclass(frozen=True)
class BlockLayout:
    """Module names relative to the model (`blocks`) and to one block (the rest)."""

    blocks: str  # the ModuleList of blocks that sees the subject's tokens
    mlp: str  # the MLP sublayer (its output is added to the residual stream)
    attn: str  # the attention sublayer (output = first element of its tuple)
    out_proj: str  # the MLP's output projection: input = key k, output = value W k
    side: str = "output"  # as InnerParam.side: "input" for an encoder's stream


LAYOUTS: dict[str, BlockLayout] = {
    "gpt2": BlockLayout("transformer.h", "mlp", "attn", "mlp.c_proj"),
    "gptj": BlockLayout("transformer.h", "mlp", "attn", "mlp.fc_out"),
    "llama": BlockLayout("model.layers", "mlp", "self_attn", "mlp.down_proj"),
    "mistral": BlockLayout("model.layers", "mlp", "self_attn", "mlp.down_proj"),
    "qwen2": BlockLayout("model.layers", "mlp", "self_attn", "mlp.down_proj"),
    # The subject is read by the encoder: its FFN (layer.1) is where facts about it are recalled.
    "t5": BlockLayout("encoder.block", "layer.1.DenseReluDense", "layer.0.SelfAttention",
                      "layer.1.DenseReluDense.wo", side="input"),
}


def layout_of(model: nn.Module) -> BlockLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise MetaEditError(f"locate-then-edit: no block layout for model_type {model_type!r} "
                            f"(known: {sorted(LAYOUTS)})")
    return LAYOUTS[model_type]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule(layout_of(model).blocks)
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def n_layers(model: nn.Module) -> int:
    return len(blocks_of(model))


def check_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """Layer indices (negative counts from the end) as sorted, distinct, in-range non-negative ints."""
    n = n_layers(model)
    bad = [i for i in layers if not -n <= int(i) < n]
    if bad or not layers:
        raise MetaEditError(f"layers {list(layers)}: need at least one index in [{-n}, {n}) for {n} blocks")
    return sorted({int(i) % n for i in layers})


def submodule(model: nn.Module, layer: int, rel: str) -> nn.Module:
    return blocks_of(model)[layer].get_submodule(rel)


def out_proj(model: nn.Module, layer: int) -> nn.Module:
    return submodule(model, layer, layout_of(model).out_proj)


def out_proj_params(model: nn.Module, layers: list[int]) -> list[InnerParam]:
    """The MLP output projections of `layers` as inner params (one per layer, in layer order)."""
    lay = layout_of(model)
    spec = [{"container": lay.blocks, "layers": layers, "pattern": re.escape(lay.out_proj), "side": lay.side}]
    return resolve_inner_params(model, spec)


def weight_out_in(w: Tensor, param: InnerParam) -> Tensor:
    """W as [d_out, d_in] (y = W k), whatever the module stores."""
    return w.T if param.transposed else w


def stored(delta_out_in: Tensor, param: InnerParam) -> Tensor:
    """A [d_out, d_in] matrix in the module's own storage orientation."""
    return delta_out_in.T if param.transposed else delta_out_in
