"""ROME — Rank-One Model Editing (Meng et al. 2022): one MLP output matrix, one rank-one update per fact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from metaedit.editors.locate_then_edit import LocateEditor
from metaedit.functional import EditedModel
from metaedit.locate import arch
from metaedit.locate.solve import regularised, rome_delta
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditRequest, LMBatch, MetaEditError


class ROMEEditor(LocateEditor):
    """W' = W + (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*) at the MLP output projection of one layer.

    k*: the MLP key at the subject's last token, averaged over the prompt behind short sampled
    contexts; v* = W k* + δ with δ the optimised shift of the MLP output there (metaedit/locate/values).
    `prompt_key`: the prompt read alone can put the subject on another token than every context does
    (SmolLM2 has no BOS token: "Mexico" opening a prompt is one token, " Mexico" after a context
    another), so its key differs from the context average and a rank-one update at k* misses it;
    then the bare prompt's key is a second column, written exactly too (rank two, `rome_delta`).
    Several requests in one call are applied one after another, each on the model as edited by the
    previous ones (ROME is a single-fact method). Without a subject the last prompt token is used
    (`subject_fallback: last_token`, with the KL term skipped) or the request is refused (`error`).
    """

    method = "rome"
    hparams_from_model = {**LocateEditor.hparams_from_model, "layers": "locate.rome_layers"}

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam],
                 layers: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(model, inner_params, layers=layers, **kwargs)
        if len(self.layers) != 1:
            raise MetaEditError(f"rome edits one layer; got layers={self.layers} (use memit for several)")

    def rank_one(self, request: EditRequest, params: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(K [d_in, m], V [d_out, m], ΔW [d_out, d_in]) for one request on the model edited by
        `params`: m = 1 (k*, v*), or 2 with `prompt_key` (the bare prompt's own key written too)."""
        layer = self.layers[0]
        p = self.inner_params[0]
        keys, _ = self.read([request], params, key_layers=[layer])
        k = keys[layer]
        w = self.weight(p, params).float()
        v = w @ k + self.per_key(self.delta(request, layer, params)[:, None])
        return k, v, rome_delta(w, k, v, regularised(self.moments(layer), self.c_ridge))

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        if not requests:
            raise MetaEditError("rome: no edit requests")
        p = self.inner_params[0]
        params: dict[str, Tensor] = {}
        for request in requests:
            w = self.weight(p, params)
            _, _, d = self.rank_one(request, params)
            params[p.name] = arch.stored(w.to(torch.float64) + d, p).to(w.dtype)
        return EditedModel(self.model, params)
