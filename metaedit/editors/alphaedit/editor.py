"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the keys of
preserved knowledge, with the keys of earlier edits kept across a sequence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from metaedit.editors.locate_then_edit import LocateEditor
from metaedit.functional import EditedModel
from metaedit.locate.solve import alphaedit_delta, null_space_projector
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditRequest, LMBatch, MetaEditError


class AlphaEditEditor(LocateEditor):
    """Per layer: ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + αI)⁻¹, residuals spread as in MEMIT.

    P projects onto the eigenvectors of C = E[k kᵀ] with eigenvalue < `null_space_threshold`
    (absolute, as in the paper: 2e-2 for Llama-3-8B), so W K₀ is unchanged for every key in
    the preserved subspace. `l2` is α.

    Sequence state: inside `editing_from` (every step of `edit_sequential`) each edit adds its keys'
    K₁K₁ᵀ to K_p K_pᵀ per layer, so later edits of the sequence leave earlier ones alone.
    `reset_sequence()` (called by `edit_sequential` first) forgets them. Edits made outside
    `editing_from` (single / batch evaluation) use only C and do not accumulate anything.
    """

    method = "alphaedit"
    hparams_from_model = {**LocateEditor.hparams_from_model, "layers": "locate.memit_layers"}
    default_n_layers = 5

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam],
                 layers: Sequence[int] | None = None, null_space_threshold: float = 2e-2, l2: float = 10.0,
                 clamp_norm_factor: float = 0.75, **kwargs: Any) -> None:
        super().__init__(model, inner_params, layers=layers, clamp_norm_factor=clamp_norm_factor, **kwargs)
        if null_space_threshold <= 0 or l2 <= 0:
            raise MetaEditError(f"alphaedit: need null_space_threshold > 0 and l2 > 0, got {null_space_threshold}, {l2}")
        self.null_space_threshold, self.l2 = null_space_threshold, l2
        self._projectors: dict[int, Tensor] = {}
        self.preserved: dict[int, Tensor] = {}  # layer -> Σ K_p K_pᵀ of this sequence's earlier edits

    def hparams(self) -> dict[str, Any]:
        return {**self._common_hparams(), "null_space_threshold": self.null_space_threshold, "l2": self.l2}

    def projector(self, layer: int) -> Tensor:
        if layer not in self._projectors:
            self._projectors[layer] = null_space_projector(self.moments(layer), self.null_space_threshold)
        return self._projectors[layer]

    def layer_delta(self, layer: int, keys: Tensor, residual: Tensor, w: Tensor) -> Tensor:
        kp = self.preserved.get(layer) if self._in_sequence else None
        return alphaedit_delta(residual, keys, self.projector(layer), kp, self.l2)

    def reset_sequence(self) -> None:
        self.preserved = {}

    def sequence_state(self) -> dict[str, Tensor]:
        return {f"preserved.{layer}": gram for layer, gram in self.preserved.items()}

    def load_sequence_state(self, state: Mapping[str, Tensor]) -> None:
        layers = {}
        for name, gram in state.items():
            kind, _, layer = name.partition(".")
            if kind != "preserved" or not layer.isdigit() or int(layer) not in self.layers:
                raise MetaEditError(f"alphaedit: a saved sequence holds {name!r}; this editor keeps "
                                    f"preserved.<layer> for layers {list(self.layers)}")
            layers[int(layer)] = gram.double()
        self.preserved = layers

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        if not requests:
            raise MetaEditError("alphaedit: no edit requests")
        params, keys = self.spread_edits(requests)
        if self._in_sequence:
            for layer, k in keys.items():
                gram = (k @ k.T).double()
                self.preserved[layer] = self.preserved[layer] + gram if layer in self.preserved else gram
        return EditedModel(self.model, params)
