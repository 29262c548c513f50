"""FT / FT-L: fine-tune the inner params on the edit loss (not learned; a baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel, forward_logits
from metaedit.losses import exact_correct, nll
from metaedit.models.inner_params import InnerParam
from metaedit.prefix import frozen_prefix, with_prefix
from metaedit.types import EditRequest, LMBatch


class FTEditor(Editor):
    """Up to `steps` Adam steps on the edit loss, stopping as soon as every edit is exactly right.

    With `linf` set this is FT-L: after each step the change is projected onto ‖θ' − θ‖∞ ≤ linf,
    which bounds how far any inner weight may move (Zhu et al. 2020's constrained fine-tuning).
    """

    method = "ft"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        steps: int = 100,
        lr: float = 1e-3,
        linf: float | None = None,
    ) -> None:
        super().__init__(model, inner_params)
        # steps=0 is the unedited model, evaluated through the same code (the benchmark's base row).
        if steps < 0 or lr <= 0 or (linf is not None and linf <= 0):
            raise ValueError(f"ft needs steps >= 0, lr > 0 and linf > 0 or null; got {steps}, {lr}, {linf}")
        self.steps, self.lr, self.linf = steps, lr, linf

    def hparams(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "linf": self.linf}

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        originals = {p.name: self.model.get_parameter(p.name).detach() for p in self.inner_params}
        # The blocks before the first inner param never change: run them once, then every step
        # replays only the tail (metaedit.prefix; a no-op where replay does not apply).
        edit = with_prefix(frozen_prefix(self.model, list(originals)), edit)
        params = {n: w.clone().requires_grad_(True) for n, w in originals.items()}
        opt = torch.optim.Adam(params.values(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = forward_logits(self.model, edit, params)
                if exact_correct(logits, edit.targets).all():
                    break
                opt.zero_grad(set_to_none=True)
                nll(logits, edit.targets).backward()
                opt.step()
                if self.linf is not None:
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(originals[n] + (p - originals[n]).clamp(-self.linf, self.linf))
        return EditedModel(self.model, {n: p.detach() for n, p in params.items()})


class FTLEditor(FTEditor):
    """FT-L: fine-tuning with every inner weight kept within ±linf of its original value."""

    method = "ftl"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        steps: int = 100,
        lr: float = 1e-3,
        linf: float = 1e-2,
    ) -> None:
        super().__init__(model, inner_params, steps=steps, lr=lr, linf=linf)
