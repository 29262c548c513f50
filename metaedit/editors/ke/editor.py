"""KE: KnowledgeEditor (De Cao et al. 2021), a hyper-network conditioned on the edit's text."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.decoding import greedy_relabel
from metaedit.editors.base import Editor
from metaedit.editors.ke.networks import ConditionEncoder, MatrixConditioner
from metaedit.editors.preserve import PreservedKeys, PreserveSpec
from metaedit.editors.rows import check_rows, per_edit_gradients
from metaedit.editors.whitening import KeyWhitening
from metaedit.functional import EditedModel, forward_logits
from metaedit.locate.stats import StatsSpec
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError

OBJECTIVES = ("shared", "constrained")


class KEEditor(Editor):
    """W' = W + Σ_i σ(η_i)·(a_i ⊙ ∇W_i + b_i) for each inner matrix W, where edit i's condition
    vector c_i (from the text "{old answer} >> {new target} || {prompt}") yields the rank-1 mask a_i,
    offset b_i and gate η_i, and ∇W_i is edit i's fine-tuning gradient (an input, not differentiated).

    Several edits: each edit gets its own condition and its own gradient and the updates are summed.
    Conditioning once on a pooled description of several edits would have to describe all of them in
    one rank-1 mask; per-edit masks keep each edit's update as it was meta-trained, and the sum is
    exact for one edit (the reference implementation refuses batches).

    Objectives: "shared" minimises c_edit·L_edit + c_loc·L_loc like every method; "constrained" is
    KE's Lagrangian c_edit·L_edit + λ·(KL − m) with λ ≥ 0 raised by gradient ascent on the same
    Lagrangian (∂/∂λ = KL − m, projected onto λ ≥ 0) and the margin m multiplied by `anneal_factor`
    whenever the running edit success passes `anneal_at`. λ, m and the running success are buffers,
    so they are saved with the editor and restored on resume.

    Args:
        hidden: LSTM hidden size (per direction) and the per-matrix MLP's hidden size.
        cond_dim: size of the condition vector c.
        init_lr: the untrained editor's plain descent step (see MatrixConditioner).
        objective: "shared" or "constrained".
        lambda_init, lambda_lr: initial λ and its gradient-ascent step size.
        margin_init, margin_min: initial KL margin and the floor annealing stops at.
        anneal_at, anneal_factor: success threshold and factor of the margin annealing.
        success_decay: decay of the running (exponential average) training edit success.
        rows: which positions' (u, δ) pairs make up ∇W_i: "nonpad" every position (the paper's
            gradient), "subject" / "subject_last" the subject's tokens / its last token on the stream
            the prompt is read on (as MEND's `rows`): neighbours share the edit's template, not its
            subject, so an update built from the subject's key moves their answers less; "target"
            the positions whose logits score the answer (causal LMs; MALMEN's late placement), "answer"
            the first of them only (metaedit/editors/rows.py).
        embed_lr: the outer optimizer's learning rate for the condition encoder's embedding copy
            (None: the trainer's). It starts as the base's pretrained embeddings, the rest of the
            editor from scratch; Adam moves every entry by ~lr per step whatever its scale, so at the
            heads' rate the copy can drift out of the base's token space (as for SERAC's cf_lr). With
            a real vocabulary it is also most of KE's parameters (SmolLM2-135M: 49152 × 576 = 28M).
        key_whitening: ridge ρ: each ∇W_i enters the conditioner as ∇W_i A · ⟨∇W_i, ∇W_i⟩/⟨∇W_i, ∇W_i A⟩,
            A = (C + ρ·mean(diag C)·I)⁻¹ from the layer's key statistics (ENN's key_whitening,
            metaedit/editors/whitening.py); None: the plain gradient. MLP output projections only.
        stats: how C is estimated (metaedit.locate.stats.StatsSpec).
        preserve: None, or where preserved facts come from (metaedit/editors/preserve.py, as ENN's):
            the training facts' answer-position keys nearest the edit rows' join the whitening, so each
            ∇W_i enters along A_P = (C_ρ + μ K_PᵀK_P)⁻¹ instead of A. Needs rows=target and key_whitening.
    """

    method = "ke"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        hidden: int = 128,
        cond_dim: int = 256,
        init_lr: float = 1.0,
        objective: Literal["shared", "constrained"] = "shared",
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        margin_init: float = 0.1,
        margin_min: float = 1e-3,
        anneal_at: float = 0.9,
        anneal_factor: float = 0.8,
        success_decay: float = 0.95,
        embed_lr: float | None = None,
        rows: Literal["nonpad", "subject", "subject_last", "target", "answer"] = "nonpad",
        key_whitening: float | None = None,
        stats: StatsSpec | dict[str, Any] | None = None,
        preserve: PreserveSpec | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, inner_params)
        self.whitening = KeyWhitening(self.method, model, inner_params, key_whitening, stats)
        self.preserve = PreservedKeys(model, self.inner_params, preserve)
        if self.preserve.enabled and (rows != "target" or not self.whitening.enabled):
            raise MetaEditError(f"{self.method} preserve needs rows=target and key_whitening (the bank holds answer-position "
                                f"keys, weighed against the whitening's C); got rows={rows!r}, key_whitening={key_whitening}")
        if objective not in OBJECTIVES:
            raise MetaEditError(f"ke objective must be one of {OBJECTIVES}, got {objective!r}")
        check_rows("ke", rows, model)
        if embed_lr is not None and embed_lr <= 0:
            raise MetaEditError(f"ke needs embed_lr > 0 or null, got {embed_lr}")
        if lambda_init < 0 or lambda_lr <= 0 or not 0 < margin_min <= margin_init or not 0 < anneal_factor < 1:
            raise MetaEditError(
                f"ke needs lambda_init >= 0, lambda_lr > 0, 0 < margin_min <= margin_init, 0 < anneal_factor < 1; "
                f"got {lambda_init}, {lambda_lr}, {margin_min}, {margin_init}, {anneal_factor}"
            )
        self.hidden, self.cond_dim, self.init_lr, self.objective = hidden, cond_dim, init_lr, objective
        self.lambda_init, self.lambda_lr = lambda_init, lambda_lr
        self.margin_init, self.margin_min = margin_init, margin_min
        self.anneal_at, self.anneal_factor, self.success_decay = anneal_at, anneal_factor, success_decay
        self.embed_lr, self.rows = embed_lr, rows
        self.encoder = ConditionEncoder(model.get_input_embeddings().weight, hidden, cond_dim)
        self.conditioners = nn.ModuleList(
            MatrixConditioner(cond_dim, hidden, p.d_out, p.d_in, init_lr) for p in self.inner_params
        )
        self.register_buffer("lagrange", torch.tensor(float(lambda_init)))
        self.register_buffer("margin", torch.tensor(float(margin_init)))
        self.register_buffer("success_ema", torch.tensor(0.0))
        # Greedy answers of the model *as it currently is*, valid only while its parameters are
        # the same objects at the same in-place version (see _answers_valid_for).
        self._old_answers: dict[tuple[str, int], str] = {}
        self._answers_state: list[tuple[Tensor, int]] = []

    def hparams(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "cond_dim": self.cond_dim, "init_lr": self.init_lr, "objective": self.objective,
                "lambda_init": self.lambda_init, "lambda_lr": self.lambda_lr, "margin_init": self.margin_init,
                "margin_min": self.margin_min, "anneal_at": self.anneal_at, "anneal_factor": self.anneal_factor,
                "success_decay": self.success_decay, "embed_lr": self.embed_lr, "rows": self.rows,
                "key_whitening": self.whitening.rho, "stats": self.whitening.stats.to_dict(),
                "preserve": None if self.preserve.spec is None else self.preserve.spec.to_dict()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        embed = self.encoder.embed.weight
        rest = [p for p in self.parameters() if p.requires_grad and p is not embed]
        embed_lr = lr if self.embed_lr is None else self.embed_lr
        return [{"params": rest, "lr": lr}, {"params": [embed] if embed.requires_grad else [], "lr": embed_lr}]

    def state_to_log(self) -> dict[str, Tensor | float]:
        if self.objective == "shared":
            return {}  # λ and the margin exist but take no part in the shared objective
        # success_ema: the running edit success that triggers the margin's annealing.
        return {"lambda": self.lagrange, "margin": self.margin, "success_ema": self.success_ema}

    # ---- conditioning ---------------------------------------------------------------------------
    def _forget_answers_if_the_model_changed(self) -> None:
        """Drop the cached answers unless they were computed by the model as it is now.

        In meta-training the base is frozen and the cache lives on; in a sequence of edits
        (edit_sequential swaps each running edit into the base) the model changes every step, and
        the unedited base's cached answer would condition the next edit on a stale prediction.
        """
        # Holding the tensors themselves (not their ids) keeps an id from being reused by another one.
        state = [(p, p._version) for p in self.model.parameters()]
        if len(state) == len(self._answers_state) and all(
            p is q and v == w for (p, v), (q, w) in zip(state, self._answers_state)
        ):
            return
        self._old_answers.clear()
        self._answers_state = state

    def old_answers(self, edit: LMBatch, requests: Sequence[EditRequest]) -> list[str]:
        """The current model's greedy answer to each prompt, as many tokens long as the new target
        (the same convention as loc_retain's greedy answers)."""
        assert self.formatter is not None
        lengths = (edit.targets != -100).sum(-1).tolist()
        keys = [(r.prompt, n) for r, n in zip(requests, lengths)]
        self._forget_answers_if_the_model_changed()
        if any(k not in self._old_answers for k in keys):
            relabelled = greedy_relabel(lambda b: forward_logits(self.model, b), edit)
            if len(self._old_answers) > 100_000:
                self._old_answers.clear()
            for k, row in zip(keys, relabelled.targets):
                self._old_answers[k] = self.formatter.tokenizer.decode(row[row != -100].tolist()).strip()
        return [self._old_answers[k] for k in keys]

    def condition(self, edit: LMBatch, requests: Sequence[EditRequest]) -> Tensor:
        if self.formatter is None:
            raise MetaEditError("ke conditions on the edit's text: attach a tokenizer (load with metaedit.load_editor)")
        if len(requests) != len(edit):
            raise MetaEditError(f"ke needs the text of every edit: {len(edit)} edits in the batch, {len(requests)} requests")
        texts = [f"{old} >> {r.target} || {r.prompt}" for old, r in zip(self.old_answers(edit, requests), requests)]
        tok = self.formatter.tokenizer(texts, padding=True, return_tensors="pt", truncation=True,
                                       max_length=self.formatter.max_length * 2)
        return self.encoder(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))

    def per_edit_gradients(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None) -> list[Tensor]:
        """∇W_i for each inner matrix and edit i, [n_edits, d_out, d_in], over the `rows` positions
        (along A with key_whitening, along A_P with preserve: metaedit/editors/whitening.py)."""
        keys: list[Tensor] | None = [] if self.preserve.enabled else None
        grads = per_edit_gradients(self.model, self.inner_params, edit, self.rows, self.formatter, requests, keys=keys)
        preserved: Sequence[Tensor | None] = [None] * len(grads)
        if keys is not None:
            if requests is None:
                raise MetaEditError(f"{self.method} preserve needs the edit requests (their subjects are never preserved)")
            preserved = self.preserve.for_step(self, keys, edit, requests)
        return [self.whitening.gradient(self, i, g, u) for i, (g, u) in enumerate(zip(grads, preserved))]

    def prepare(self) -> None:
        """The key statistics, when key_whitening is on, and the preserved facts' keys, when preserve
        is (each computed once per base model and data, then cached)."""
        self.whitening.prepare(self)
        self.preserve.prepare(self)

    def training_step_scope(self, batch: EditBatch) -> AbstractContextManager[None]:
        return self.preserve.scoring(batch)  # the prompts this step scores are never preserved

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        c = self.condition(edit, requests)
        new_params: dict[str, Tensor] = {}
        for p, conditioner, grad in zip(self.inner_params, self.conditioners, self.per_edit_gradients(edit, requests)):
            delta = conditioner(c, grad)  # [d_out, d_in]
            if p.transposed:
                delta = delta.T  # Conv1D stores W as [d_in, d_out]
            w = self.model.get_parameter(p.name)
            new_params[p.name] = w + delta.to(w.dtype)
        return EditedModel(self.model, new_params)

    # ---- objective ------------------------------------------------------------------------------
    def outer_objective(
        self, l_edit: Tensor, l_loc: Tensor, c_edit: float, c_loc: float, edit_success: Tensor | None = None
    ) -> Tensor:
        if self.objective == "shared":
            return super().outer_objective(l_edit, l_loc, c_edit, c_loc, edit_success)
        # Cloned: the loss uses this step's (λ, m), which dual_step then updates in place before backward.
        loss = c_edit * l_edit + self.lagrange.clone() * (l_loc - self.margin.clone())
        if self.training and torch.is_grad_enabled():
            self.dual_step(l_loc.detach(), edit_success)
        return loss

    @torch.no_grad()
    def dual_step(self, kl: Tensor, edit_success: Tensor | None) -> None:
        """One gradient-ascent step on λ and the margin schedule (called once per training step)."""
        if not torch.isfinite(kl):
            return  # a skipped (non-finite) step must not move λ either
        # ∂/∂λ [c_edit·L_edit + λ(KL − m)] = KL − m: λ grows while the constraint is violated and
        # shrinks once it holds; projecting onto λ ≥ 0 is what makes it a multiplier of "KL ≤ m".
        self.lagrange.add_(self.lambda_lr * (kl - self.margin)).clamp_(min=0.0)
        if edit_success is None:
            return
        self.success_ema.mul_(self.success_decay).add_((1 - self.success_decay) * edit_success.float().mean())
        if self.success_ema > self.anneal_at and self.margin > self.margin_min:
            self.margin.mul_(self.anneal_factor).clamp_(min=self.margin_min)
            # The running success must pass the threshold again (on the tighter margin) before the next step.
            self.success_ema.zero_()


class KEConstrainedEditor(KEEditor):
    """KE trained with its original constrained objective (a registered name of its own, like FT-L,
    so runs, checkpoints and result tables of the two objectives never collide)."""

    method = "ke_constrained"

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam], **hparams: Any) -> None:
        # Every KEEditor hyper-parameter except the objective, which this name fixes.
        if "objective" in hparams:
            raise MetaEditError("ke_constrained fixes objective=constrained; use method=ke to choose it")
        super().__init__(model, inner_params, objective="constrained", **hparams)

    def hparams(self) -> dict[str, Any]:
        return {k: v for k, v in super().hparams().items() if k != "objective"}
