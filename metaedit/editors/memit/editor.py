"""MEMIT — Mass-Editing Memory in a Transformer (Meng et al. 2023): a batch of facts spread over
several consecutive MLP layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from metaedit.editors.locate_then_edit import LocateEditor
from metaedit.locate.solve import memit_delta, regularised
from metaedit.models.inner_params import InnerParam
from metaedit.types import MetaEditError


class MEMITEditor(LocateEditor):
    """Per layer ℓ (in order): ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ with K the new keys at ℓ and R the residual
    still missing at the last edited layer divided among the layers left (LocateEditor.spread_edits).

    `mom2_update_weight` is λ: C = E[k kᵀ] is a per-token average while K Kᵀ sums the edits, so λ
    says how many tokens' worth of old associations one layer must keep (MEMIT: 1.5e4 for GPT-J).
    """

    method = "memit"
    hparams_from_model = {**LocateEditor.hparams_from_model, "layers": "locate.memit_layers",
                          "mom2_update_weight": "locate.mom2_update_weight"}
    default_n_layers = 5

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam],
                 layers: Sequence[int] | None = None, mom2_update_weight: float | None = 15000.0,
                 clamp_norm_factor: float = 0.75, **kwargs: Any) -> None:
        super().__init__(model, inner_params, layers=layers, clamp_norm_factor=clamp_norm_factor, **kwargs)
        mom2_update_weight = 15000.0 if mom2_update_weight is None else mom2_update_weight
        if mom2_update_weight <= 0:
            raise MetaEditError(f"memit: mom2_update_weight must be > 0, got {mom2_update_weight}")
        self.mom2_update_weight = mom2_update_weight

    def hparams(self) -> dict[str, Any]:
        return {**self._common_hparams(), "mom2_update_weight": self.mom2_update_weight}

    def layer_delta(self, layer: int, keys: Tensor, residual: Tensor, w: Tensor) -> Tensor:
        return memit_delta(residual, keys, regularised(self.moments(layer), self.c_ridge), self.mom2_update_weight)
