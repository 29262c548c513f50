"""MEND: Model Editor Networks with Gradient Decomposition."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.editors.base import Editor
from metaedit.editors.mend.networks import GradientTransform
from metaedit.editors.rows import answer_mask
from metaedit.editors.whitening import KeyWhitening
from metaedit.functional import EditedModel, forward_logits
from metaedit.hooks import capture_layer_io
from metaedit.locate.stats import StatsSpec
from metaedit.locate.tokens import subject_row_mask
from metaedit.losses import exact_correct, nll, rival_logprob
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditRequest, LMBatch, MetaEditError

RowsMode = Literal["nonpad", "target", "answer", "subject", "subject_last"]
ROWS_MODES: tuple[str, ...] = ("nonpad", "target", "answer", "subject", "subject_last")


def layer_rows(method: str, rows: RowsMode | Sequence[RowsMode], inner_params: Sequence[InnerParam]) -> list[RowsMode]:
    """One rows mode per inner parameter: `rows` itself for each, or its list checked against them."""
    modes = [rows] * len(inner_params) if isinstance(rows, str) else list(rows)
    if len(modes) != len(inner_params):
        raise MetaEditError(f"{method} rows lists {len(modes)} modes for {len(inner_params)} inner parameters "
                            f"({[p.module_name for p in inner_params]}): give one mode, or one per parameter")
    bad = [m for m in modes if m not in ROWS_MODES]
    if bad:
        raise MetaEditError(f"{method} rows must be one of {list(ROWS_MODES)} (or a list of them), got {rows!r}")
    return modes


class MENDEditor(Editor):
    """For y = W u + b the edit-loss gradient is Σ_t δ_t u_tᵀ; MEND maps each (u_t, δ_t) to a pseudo
    pair (ũ_t, δ̃_t) and applies W' = W − η_ℓ Σ_t δ̃_t ũ_tᵀ (descent; the reference code adds).

    Args:
        rank: rank r of the low-rank residual blocks (clamped to d_in + d_out).
        edit_lr: initial value of the learned per-layer step size η_ℓ.
        rows: which positions' (u, δ) pairs make the update. "nonpad" keeps every position with a
            non-zero u and δ (the reference behaviour); "target" keeps only target positions on the
            output stream (encoder layers keep all); "answer" only the first of them, the position that
            predicts the answer's first token (one key per edit: the positions inside the target read
            the target's own tokens, which a neighbour's answer is scored on too); "subject" keeps the subject's tokens and
            "subject_last" its last token, on the stream the prompt is read on (decoder layers of a
            seq2seq model keep all): a key taken where the subject is read differs between facts
            that share a template, so the update moves their answers less (DESIGN §2, locality).
            A request without a subject uses its last prompt token (logged once). A list gives one
            mode per inner parameter (in their order): e.g. the subject's last token at middle blocks,
            where a key tells subjects apart, beside the answer rows of the last blocks.
        n_blocks: residual blocks in each network.
        act: activation of the residual blocks (gelu, silu, tanh).
        chunk_size: edits per base forward/backward when an edit is applied: the update is a sum
            over rows, so chunks give the same ΔW while memory scales with the chunk (one pass over
            1000 SmolLM2 edits was killed for memory at 22 GB).
        edit_scale: a fixed multiplier on the learned step sizes η_ℓ. Meta-training learns η for its
            own balance of L_edit and L_loc; at edit time a user may want more edit success for some
            locality (or the reverse) without retraining: load a trained editor with
            `hparams={"edit_scale": s}` (evaluate.py / edit.py `+hparams.edit_scale=s`) and choose s
            on validation edits. 1.0 leaves the trained editor as it is.
        edit_steps: MEND steps at edit time (meta-training learns one): each further step reads the
            gradient at the weights the previous steps made and goes only to the edits whose target
            is not yet the greedy answer. Like edit_scale, a way to buy edit success with locality
            (measured on SmolLM2 in the README's "What was tried"); 1 leaves the trained editor as it is.
        edit_contrast: weight β of a second term in the loss whose gradient the networks read:
            NLL(target) + β·log P(the model's own answer token where it first leaves the target;
            losses.rival_logprob), 0 where greedy decoding already gives the target. With β = 0 (the
            reference) the gradient says "make the target likely", which also raises answers of the
            same kind — the old one among them; with β > 0
            it says "the target rather than the current answer", which is what an edit's success
            (P(new) > P(old)) asks. Needs no old answer from the user: it is read off the model.
            Trained editors should be trained with the β they are used with.
        transform_delta: False: the networks learn only the key ũ and δ̃ is the normalised gradient δ
            (networks.GradientTransform), so an edit of a kind of fact training never showed moves the
            layer's output the way that fact's own gradient does. True (the reference) learns both.
        key_whitening: ridge ρ of a ROME-style direction for the key: None (the reference) applies
            ũ as the networks give it; ρ > 0 applies ũ_w = A ũ · (ũᵀũ)/(ũᵀA ũ) with
            A = (C + ρ·mean(diag C)·I)⁻¹ and C = E[k kᵀ] the second moment of the layer's keys over a
            generic corpus (`stats`, metaedit.locate.stats, cached per base model). The scale keeps
            the update's effect along ũ itself; a key k' of another prompt sees ũ_wᵀk' = ũᵀA k' (times
            that scale), small for directions every text uses — the component a neighbour's key
            shares with the edit's (same template, same kind of subject) — so the edit moves such
            neighbours less. Smaller ρ whitens more (ROME's c_ridge is 1e-4). Only MLP output
            projections (whose input is the key C describes) may be edited with it. Train with the
            ρ the editor is used with; `+hparams.key_whitening=ρ` changes it at edit time.
        stats: how C is estimated (metaedit.locate.stats.StatsSpec; default: text sampled from the
            base model itself, nothing from the edit data).
        edit_lr_lr: the outer optimizer's learning rate for the step sizes η_ℓ (None: the trainer's;
            the reference code's `lr_lr`). Adam moves a parameter by about its learning rate per
            step, so at the networks' rate η needs thousands of steps to grow tenfold from 1e-4.
    """

    method = "mend"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        rank: int = 1920,
        edit_lr: float = 1e-4,
        rows: RowsMode | Sequence[RowsMode] = "nonpad",
        n_blocks: int = 2,
        act: str = "gelu",
        edit_lr_lr: float | None = None,
        chunk_size: int = 64,
        edit_scale: float = 1.0,
        edit_steps: int = 1,
        edit_contrast: float = 0.0,
        transform_delta: bool = True,
        key_whitening: float | None = None,
        stats: StatsSpec | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, inner_params)
        if chunk_size < 1:
            raise MetaEditError(f"{self.method} chunk_size must be >= 1, got {chunk_size}")
        self.rows = rows  # checked, and resolved to one mode per inner parameter (layer_rows)
        if edit_lr_lr is not None and edit_lr_lr <= 0:
            raise MetaEditError(f"{self.method} edit_lr_lr must be > 0 or null, got {edit_lr_lr}")
        if not edit_scale > 0:
            raise MetaEditError(f"{self.method} edit_scale must be > 0, got {edit_scale}")
        if edit_steps < 1:
            raise MetaEditError(f"{self.method} edit_steps must be >= 1, got {edit_steps}")
        if not edit_contrast >= 0:
            raise MetaEditError(f"{self.method} edit_contrast must be >= 0, got {edit_contrast}")
        self.rank, self.edit_lr_init, self.n_blocks, self.act = rank, edit_lr, n_blocks, act
        self.edit_lr_lr, self.chunk_size, self.edit_scale = edit_lr_lr, chunk_size, float(edit_scale)
        self.edit_steps, self.edit_contrast = int(edit_steps), float(edit_contrast)
        self.transform_delta = bool(transform_delta)
        # Refuses a layer without key statistics now, not at the first edit.
        self.whitening = KeyWhitening(self.method, model, inner_params, key_whitening, stats)
        # One network per distinct (d_in, d_out), shared by all layers of that shape.
        shapes = sorted({(p.d_in, p.d_out) for p in self.inner_params})
        self._slot: list[tuple[str, int]] = []
        count: dict[str, int] = {}
        for p in self.inner_params:
            key = f"{p.d_in}x{p.d_out}"
            self._slot.append((key, count.get(key, 0)))
            count[key] = count.get(key, 0) + 1
        self.nets = nn.ModuleDict(
            {f"{i}x{o}": GradientTransform(i, o, count[f"{i}x{o}"], rank, n_blocks, act, self.transform_delta) for i, o in shapes}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.inner_params),), float(edit_lr)))

    @property
    def rows(self) -> RowsMode | list[RowsMode]:
        return self._rows

    @rows.setter
    def rows(self, rows: RowsMode | Sequence[RowsMode]) -> None:
        self.layer_rows = layer_rows(self.method, rows, self.inner_params)
        self._rows: RowsMode | list[RowsMode] = rows if isinstance(rows, str) else list(rows)

    def hparams(self) -> dict[str, Any]:
        return {"rank": self.rank, "edit_lr": self.edit_lr_init, "rows": self.rows, "n_blocks": self.n_blocks,
                "act": self.act, "edit_lr_lr": self.edit_lr_lr, "chunk_size": self.chunk_size, "edit_scale": self.edit_scale,
                "edit_steps": self.edit_steps, "edit_contrast": self.edit_contrast,
                "transform_delta": self.transform_delta, "key_whitening": self.whitening.rho,
                "stats": self.whitening.stats.to_dict()}

    def step_size(self, i: int) -> Tensor:
        """The step size η_ℓ of inner layer i as an edit applies it (times the fixed edit_scale)."""
        return self.edit_lrs[i] * self.edit_scale

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        rest = [p for p in self.parameters() if p.requires_grad and p is not self.edit_lrs]
        # No weight decay on η: it would pull the step sizes towards 0, a value with no meaning here.
        return [{"params": rest, "lr": lr},
                {"params": [self.edit_lrs], "lr": lr if self.edit_lr_lr is None else self.edit_lr_lr, "weight_decay": 0.0}]

    def prepare(self) -> None:
        """The key statistics, when key_whitening is on (computed once per base model, then cached)."""
        self.whitening.prepare(self)

    def whiten(self, i: int, u: Tensor) -> Tensor:
        """ũ_w = A ũ · (ũᵀũ)/(ũᵀA ũ) for the rows of inner layer i (key_whitening; else ũ)."""
        return self.whitening.rows(self, i, u)

    def state_to_log(self) -> dict[str, Tensor | float]:
        # The learned step sizes η_ℓ: their scale says whether the edits are still growing.
        eta = self.edit_lrs.detach()
        state: dict[str, Tensor | float] = {"edit_lr_mean": eta.mean(), "edit_lr_min": eta.min(), "edit_lr_max": eta.max()}
        state.update({f"edit_lr/{p.module_name}": e for p, e in zip(self.inner_params, eta)})
        return state

    def capture(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                params: Mapping[str, Tensor] | None = None, owners: list[Tensor] | None = None,
                ) -> list[tuple[Tensor, Tensor]]:
        """(u, δ) rows for every inner layer: one forward + a backward that stops at the earliest
        inner layer (autograd.grad w.r.t. layer outputs only, never into base parameters).
        `requests` (one per row of `edit`) are needed by the subject row modes. `owners`, when given,
        receives per inner layer the edit (row of `edit`) each kept row belongs to."""
        subject_masks: dict[str, Tensor] = {}
        for mode in {"subject", "subject_last"} & set(self.layer_rows):
            if requests is None or len(requests) != len(edit):
                raise MetaEditError(f"{self.method} rows={mode!r} needs one edit request per row of the edit batch")
            if self.formatter is None:
                raise MetaEditError(f"{self.method} rows={mode!r} needs the tokenizer; load the editor with one")
            mask = subject_row_mask(self.formatter, edit, requests, last_only=mode == "subject_last")
            subject_masks[mode] = mask.reshape(-1).to(edit.input_ids.device)
        modules = {p.module_name: self.model.get_submodule(p.module_name) for p in self.inner_params}
        with torch.enable_grad(), capture_layer_io(modules) as io:
            logits = forward_logits(self.model, edit, params)
            # Sum over tokens: per-token δ must not shrink as more edits share a batch.
            loss = nll(logits, edit.targets, reduction="sum")
            if self.edit_contrast > 0:
                loss = loss + self.edit_contrast * rival_logprob(logits, edit.targets).sum()
            outputs = [io[p.module_name][1] for p in self.inner_params]
            deltas = torch.autograd.grad(loss, outputs)
        target_masks = {mode: answer_mask(edit.targets, first_only=mode == "answer").reshape(-1)
                        for mode in {"target", "answer"} & set(self.layer_rows)}
        rows = []
        for p, delta, mode in zip(self.inner_params, deltas, self.layer_rows):
            x = io[p.module_name][0]
            u = x.reshape(-1, p.d_in)
            d = delta.reshape(-1, p.d_out)
            keep = (u != 0).any(-1) & (d != 0).any(-1)  # padding rows contribute nothing
            target_mask, subject_mask = target_masks.get(mode), subject_masks.get(mode)
            if target_mask is not None and p.side == "output" and target_mask.numel() == keep.numel():
                keep &= target_mask.to(keep.device)
            elif subject_mask is not None and (p.side == "input" or edit.decoder_input_ids is None):
                # The prompt is read on the input stream (causal LMs: their only stream); a seq2seq
                # decoder sees only the target, so its layers keep every row.
                keep &= subject_mask
            # In the networks' dtype: float32, unless the editor was converted (float64 for exact checks).
            rows.append((u[keep].to(self.edit_lrs.dtype), d[keep].to(self.edit_lrs.dtype)))
            if owners is not None:  # x is [edits, positions, d_in]: a row's edit is its first index
                owners.append(torch.arange(x.shape[0], device=keep.device).repeat_interleave(u.shape[0] // x.shape[0])[keep])
        return rows

    def transform(self, rows: Sequence[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """(u, δ) -> (ũ, δ̃) for every inner layer. Layers that share a network and have the same number
        of rows (the usual case: every layer sees the same positions) go through it as one stack."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (u, _) in enumerate(rows):
            groups.setdefault((self._slot[i][0], u.shape[0]), []).append(i)
        out = list(rows)
        for (key, _), idx in groups.items():
            u_t, d_t = self.nets[key](
                torch.stack([rows[i][0] for i in idx]), torch.stack([rows[i][1] for i in idx]), [self._slot[i][1] for i in idx]
            )
            for j, i in enumerate(idx):
                out[i] = (u_t[j], d_t[j])
        return out

    def chunks(self, edit: LMBatch, requests: Sequence[EditRequest] | None) -> Iterator[tuple[LMBatch, Sequence[EditRequest] | None]]:
        """`edit` (and its requests) in pieces of at most `chunk_size` rows."""
        if len(edit) <= self.chunk_size:
            yield edit, requests
            return
        for start in range(0, len(edit), self.chunk_size):
            stop = min(start + self.chunk_size, len(edit))
            yield edit.select(torch.arange(start, stop)), None if requests is None else requests[start:stop]

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        new_params: dict[str, Tensor] = {p.name: self.model.get_parameter(p.name) for p in self.inner_params}
        # Meta-training learns one step; further steps (edit_steps > 1) are an edit-time choice.
        steps = 1 if self.training else self.edit_steps
        for k in range(steps):
            start = dict(new_params)  # every chunk of step k reads the weights step k started from
            todo, todo_requests = edit, requests
            if k > 0:
                # A further step goes only to the edits whose target is not yet the greedy answer: one
                # that landed would only move more of the model.
                with torch.no_grad():
                    pending = ~exact_correct(forward_logits(self.model, edit, start), edit.targets).cpu()
                if not pending.any():
                    break
                todo = edit.select(pending)
                todo_requests = [r for r, keep in zip(requests, pending.tolist()) if keep]
            for part, part_requests in self.chunks(todo, todo_requests):
                rows = self.capture(part, part_requests, start if k > 0 else None)
                for i, (p, (u_t, d_t)) in enumerate(zip(self.inner_params, self.transform(rows))):
                    w = new_params[p.name]
                    # W − η Σ_t δ̃_t ũ_tᵀ as one fused addmm; η scales the n × d_out rows, not the full product.
                    step, u_t = (d_t * -self.step_size(i)).to(w.dtype), self.whiten(i, u_t).to(w.dtype)
                    # Conv1D stores W as [d_in, d_out].
                    new_params[p.name] = torch.addmm(w, u_t.T, step) if p.transposed else torch.addmm(w, step.T, u_t)
        return EditedModel(self.model, new_params)
