"""ENN: Editable Neural Networks (Sinitsin et al. 2020), MAML-style meta-training of the base."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.editors.base import Editor
from metaedit.editors.preserve import PreservedKeys, PreserveSpec
from metaedit.editors.rows import check_rows, per_edit_gradients
from metaedit.editors.whitening import KeyWhitening
from metaedit.functional import EditedModel, forward_logits, swapped_params
from metaedit.locate.stats import StatsSpec
from metaedit.losses import nll, token_kl
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError

# Attention implementations whose backward is itself differentiable on every device.
DOUBLE_BACKWARD_ATTENTION = ("eager",)


class ENNEditor(Editor):
    """θ' = θ − α ⊙ ∇_θ L(θ; z_e), k plain gradient steps on the edit loss, where θ (the inner params,
    optionally a larger trained set) and one step size α per inner tensor are meta-trained so that
    these steps make good edits.

    The editor owns a trainable copy of θ (initialised from the base); the base model keeps the
    original θ0, which the c_base term KL(p_θ0 ‖ p_θ) on out-of-scope inputs pulls θ back towards.
    Locality of an edit is measured against the current meta-trained θ, not θ0.

    Args:
        edit_lr: initial step size α (stored as log α: positive, and spans orders of magnitude).
        n_steps: inner gradient steps k.
        edit_steps: inner steps at edit time, outside meta-training (None: n_steps). Meta-training
            learns θ and α for k steps; one more step at edit time pushes further only the edits the
            first did not land (a landed edit's gradient is small): SmolLM2, blocks 24–29, one step
            trained, two at edit time: es 0.935 → 1.000, ps 0.807 → 0.872, ns 0.803 → 0.759.
        first_order: detach the inner gradient (first-order MAML): dθ'/dθ = I, dθ'/dα = −∇L.
        c_base: weight of KL(p_θ0 ‖ p_θ) on the locality inputs (the original stays frozen).
        train_pattern: regex over base parameter names meta-trained in addition to the inner params
            (trained, never edited); None trains only the inner params.
        step_size_lr: the outer optimizer's learning rate for the log step sizes (None: the
            trainer's). θ are base weights that want a small learning rate; log α is one scalar per
            tensor whose useful range spans orders of magnitude, and at θ's rate Adam moves it by at
            most ~lr per step (tiny-gpt2, lr 3e-4: α 0.92–1.03 from 1.0 after 1000 steps).
        rows: which positions' (u, δ) pairs make the inner gradient (metaedit/editors/rows.py):
            "nonpad" the plain gradient, "subject" / "subject_last" the subject's (last) token(s) only,
            "target" the answer-scoring positions (causal LMs), "answer" the first of them only. Rows other than nonpad need
            first_order: the masked gradient is built from captured (u, δ), which carry no graph for a
            second-order outer loss.
        key_whitening: ridge ρ of a ROME-style direction for the step: None (the paper) steps along
            the plain gradient G = Σ δ uᵀ; ρ > 0 steps along G A · ⟨G, G⟩/⟨G, G A⟩ with
            A = (C + ρ·mean(diag C)·I)⁻¹, C the second moment of the layer's keys
            (metaedit/editors/whitening.py): the step lowers the edit loss as much to first order and
            moves the outputs of keys every text shares (a neighbour's, largely) less. Needs every
            inner parameter to be an MLP output projection. The plain step along G moves neighbours
            about as much as it lands the edit on SmolLM2 (README "ENN and KE on SmolLM2").
        stats: how C is estimated (metaedit.locate.stats.StatsSpec; default: text sampled from the
            base model itself, nothing from the edit data).
        preserve: None, or where preserved facts come from (metaedit/editors/preserve.py, as
            MALMEN's): the keys of the training facts nearest each edit's answer-position keys join
            C, so that A = (C_ρ + μ K_PᵀK_P)⁻¹ and the step leaves those keys' outputs (nearly)
            unmoved. At the answer position one relation's prompts share most of their key, so
            whitening by C alone still writes the edit into its neighbours (SmolLM2, blocks 24–29,
            untrained step: ns 0.23 at es 1.00; 0.62 at es 0.97 with preserve). Needs rows=target
            and key_whitening.
    """

    method = "enn"
    # Second-order meta-training differentiates through a backward pass; fused SDPA kernels on CPU
    # have no double backward, so the loading code gives this method eager attention.
    attn_implementation: ClassVar[str | None] = "eager"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        edit_lr: float = 1e-3,
        n_steps: int = 1,
        edit_steps: int | None = None,
        first_order: bool = False,
        c_base: float = 1.0,
        train_pattern: str | None = None,
        step_size_lr: float | None = None,
        rows: str = "nonpad",
        key_whitening: float | None = None,
        stats: StatsSpec | dict[str, Any] | None = None,
        preserve: PreserveSpec | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, inner_params)
        check_rows("enn", rows, model)
        self.whitening = KeyWhitening(self.method, model, inner_params, key_whitening, stats)
        self.preserve = PreservedKeys(model, self.inner_params, preserve)
        if self.preserve.enabled and (rows != "target" or not self.whitening.enabled):
            raise MetaEditError(f"enn preserve needs rows=target and key_whitening (the bank holds answer-position "
                                f"keys, weighed against the whitening's C); got rows={rows!r}, key_whitening={key_whitening}")
        if rows != "nonpad" and not first_order:
            raise MetaEditError(f"enn rows={rows!r} needs first_order=true (the masked gradient carries no second-order graph)")
        if edit_lr <= 0 or n_steps < 1 or c_base < 0 or (step_size_lr is not None and step_size_lr <= 0) or (
                edit_steps is not None and edit_steps < 1):
            raise MetaEditError(f"enn needs edit_lr > 0, n_steps >= 1, edit_steps >= 1 or null, c_base >= 0, step_size_lr > 0 "
                                f"or null; got {edit_lr}, {n_steps}, {edit_steps}, {c_base}, {step_size_lr}")
        self.edit_steps = None if edit_steps is None else int(edit_steps)
        self.edit_lr_init, self.n_steps, self.first_order = edit_lr, n_steps, first_order
        self.c_base, self.train_pattern, self.step_size_lr, self.rows = c_base, train_pattern, step_size_lr, rows
        inner_names = [p.name for p in self.inner_params]
        extra: list[str] = []
        if train_pattern is not None:
            pattern = re.compile(train_pattern)
            extra = [n for n, _ in model.named_parameters() if pattern.fullmatch(n) and n not in inner_names]
            if not extra:
                raise MetaEditError(f"enn train_pattern {train_pattern!r} matches no base parameter outside the inner params")
        # Inner params first: the inner loop edits trained[:len(inner_params)].
        self.trained_names: list[str] = inner_names + extra
        self.theta = nn.ParameterList(
            nn.Parameter(model.get_parameter(n).detach().clone()) for n in self.trained_names
        )
        self.log_lrs = nn.Parameter(torch.full((len(self.inner_params),), float(edit_lr)).log())

    def hparams(self) -> dict[str, Any]:
        return {"edit_lr": self.edit_lr_init, "n_steps": self.n_steps, "edit_steps": self.edit_steps, "first_order": self.first_order,
                "c_base": self.c_base, "train_pattern": self.train_pattern, "step_size_lr": self.step_size_lr, "rows": self.rows,
                "key_whitening": self.whitening.rho, "stats": self.whitening.stats.to_dict(),
                "preserve": None if self.preserve.spec is None else self.preserve.spec.to_dict()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        theta = [p for p in self.parameters() if p.requires_grad and p is not self.log_lrs]
        # No weight decay on log α: decay would pull α towards 1, a value with no meaning here.
        step_sizes = {"params": [self.log_lrs] if self.log_lrs.requires_grad else [],
                      "lr": lr if self.step_size_lr is None else self.step_size_lr, "weight_decay": 0.0}
        return [{"params": theta, "lr": lr}, step_sizes]

    def prepare(self) -> None:
        """The key statistics, when key_whitening is on, and the preserved facts' keys, when preserve
        is (each computed once per base model and data, then cached)."""
        self.whitening.prepare(self)
        self.preserve.prepare(self)

    def training_step_scope(self, batch: EditBatch) -> AbstractContextManager[None]:
        return self.preserve.scoring(batch)  # the prompts this step scores are never preserved

    def _whiten(self, grads: Sequence[Tensor], preserved: Sequence[Tensor | None] | None = None) -> tuple[Tensor, ...]:
        """Each inner gradient along A (key_whitening; with `preserved` keys, A_P), in the stored
        layout (Conv1D: [d_in, d_out])."""
        if not self.whitening.enabled:
            return tuple(grads)
        out = []
        for i, (p, g) in enumerate(zip(self.inner_params, grads)):
            w = self.whitening.gradient(self, i, g.T if p.transposed else g, None if preserved is None else preserved[i])
            out.append(w.T if p.transposed else w)
        return tuple(out)

    def tensors_new_to(self, saved: Editor) -> set[str]:
        # A run that meta-trains more base parameters than `saved` did (a train_pattern added to a
        # trained editor) starts those from the base's weights, as a fresh run would: θ lists the
        # inner params first, then the extra ones, so saved's θ must be a prefix of this run's.
        old = getattr(saved, "trained_names", None)
        if old is None or self.trained_names[:len(old)] != old:
            return set()
        return {f"theta.{i}" for i in range(len(old), len(self.trained_names))}

    # At most this many inner tensors get a logged step size each (the defaults edit 6–12 tensors).
    LOG_EACH_STEP_SIZE_UP_TO: ClassVar[int] = 12

    def state_to_log(self) -> dict[str, Tensor | float]:
        alpha = self.log_lrs.detach().exp()
        state: dict[str, Tensor | float] = {"step_size_mean": alpha.mean(), "step_size_min": alpha.min(),
                                            "step_size_max": alpha.max()}
        if len(self.inner_params) <= self.LOG_EACH_STEP_SIZE_UP_TO:
            state.update({f"step_size/{p.name}": a for p, a in zip(self.inner_params, alpha)})
        return state

    def current_params(self) -> dict[str, Tensor]:
        """The meta-trained θ (the editor's copy), by base parameter name."""
        return {n: p.to(self.model.get_parameter(n).dtype) for n, p in zip(self.trained_names, self.theta)}

    @contextmanager
    def editing_from(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        # Edits start from θ (current_params), not from the base's weights: in a sequence, θ itself
        # must be the running edit for the next step, and θ is put back in `finally`.
        theta = {f"theta.{i}": nn.Parameter(params[n].detach(), requires_grad=False)
                 for i, n in enumerate(self.trained_names) if n in params}
        with super().editing_from(params), swapped_params(self, theta):
            yield

    def base_logits(self, batch: LMBatch) -> Tensor:
        # An edit must leave the *meta-trained* model unchanged elsewhere; θ0 enters only via c_base.
        with torch.no_grad():
            return forward_logits(self.model, batch, self.current_params())

    def _check_attention(self) -> None:
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if impl is not None and impl not in DOUBLE_BACKWARD_ATTENTION:
            raise MetaEditError(
                f"enn second-order meta-training differentiates through a backward pass, which attention "
                f"implementation {impl!r} does not support; load the base with attn_implementation='eager' "
                f"(train.py does this for enn), or set method.editor.first_order=true"
            )

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        # The outer loss is differentiated only in meta-training (training mode, graph recorded); an
        # edit at inference needs the inner gradient but never a graph through it.
        meta = self.training and torch.is_grad_enabled() and self.trainable()
        second_order = meta and not self.first_order
        if second_order:
            self._check_attention()
        params = self.current_params()
        names = self.trained_names[: len(self.inner_params)]
        lrs = self.log_lrs.exp()
        steps = self.n_steps if self.training or self.edit_steps is None else self.edit_steps
        for _ in range(steps):
            preserved = None
            if self.rows != "nonpad":  # first order only (checked in __init__)
                view = {n: v.detach() for n, v in params.items()}
                keys: list[Tensor] | None = [] if self.preserve.enabled else None
                total = per_edit_gradients(self.model, self.inner_params, edit, self.rows, self.formatter, requests,
                                           view, summed=True, keys=keys)
                # [d_out, d_in] back to the stored layout (Conv1D: [d_in, d_out]).
                grads = tuple(g.T if p.transposed else g for p, g in zip(self.inner_params, total))
                if keys is not None:
                    preserved = self.preserve.for_step(self, keys, edit, requests)
            else:
                grads = self._plain_gradients(edit, params, names, second_order)
            grads = self._whiten(grads, preserved)
            with torch.set_grad_enabled(meta):
                for i, (n, g) in enumerate(zip(names, grads)):
                    params[n] = params[n] - (lrs[i] * g).to(params[n].dtype)
        return EditedModel(self.model, params)

    def _plain_gradients(self, edit: LMBatch, params: dict[str, Tensor], names: list[str],
                         second_order: bool) -> tuple[Tensor, ...]:
        """∇L of the summed edit loss w.r.t. the inner params at `params` (the plain gradient, every position)."""
        with torch.enable_grad():
            # Second order: differentiate at the graph-carrying weights and keep that graph
            # (create_graph), so the outer loss sees d∇L/dθ. Otherwise the gradient is taken at
            # detached leaves and enters θ' as a constant: first-order MAML, dθ'/dθ = I.
            at = {n: params[n] if second_order else params[n].detach().requires_grad_(True) for n in names}
            view = {**params, **at} if second_order else {**{n: v.detach() for n, v in params.items()}, **at}
            # Summed over target tokens so the per-edit step does not shrink as edits share a batch.
            loss = nll(forward_logits(self.model, edit, view), edit.targets, reduction="sum")
            return torch.autograd.grad(loss, list(at.values()), create_graph=second_order)

    def extra_losses(self, batch: EditBatch, edited: EditedModel) -> dict[str, Tensor]:
        if self.c_base == 0:
            return {}
        with torch.no_grad():
            original = forward_logits(self.model, batch.loc)
        current = forward_logits(self.model, batch.loc, self.current_params())
        return {"base": self.c_base * token_kl(original, current, batch.loc.kl_mask)}
