"""MALMEN: massive editing as least-squares aggregation of MEND-style updates (Tan et al., ICLR 2024)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.editors.mend import MENDEditor
from metaedit.editors.mend.editor import RowsMode
from metaedit.editors.preserve import PreservedKeys, PreserveSpec
from metaedit.editors.rephrase import RephraseSpec, TrainingRephrases
from metaedit.editors.whitening import KeyWhitening
from metaedit.functional import EditedModel
from metaedit.locate.stats import StatsSpec
from metaedit.losses import exact_correct, mean_target_logprob
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError

log = logging.getLogger(__name__)


def solve_shift(gram: Tensor, cross: Tensor, log_lambda: Tensor, ridge: Tensor | None = None) -> Tensor:
    """ΔW = Dᵀ K (Kᵀ K + e^λ R)⁻¹ from gram = KᵀK [d_in, d_in] and cross = DᵀK [d_out, d_in], R = I
    unless `ridge` [d_in, d_in] (symmetric positive definite) is given.

    KᵀK + e^λ R is symmetric, so ΔWᵀ = (KᵀK + e^λ R)⁻¹ KᵀD: one solve in d_in dimensions whatever the
    number of rows of K. It is the solution of min ‖K ΔWᵀ − D‖² + e^λ tr(ΔW R ΔWᵀ): the shift that best
    maps every key to its value shift at once, instead of summing per-edit updates (MEND) that
    cancel as edits accumulate. As λ → ∞, e^λ ΔW → DᵀK R⁻¹ = Σ_t d_t (R⁻¹k_t)ᵀ, a summed rank-1 update.
    With R the keys' second moment over generic text (MEMIT's C), the penalty tr(ΔW C ΔWᵀ) = E‖ΔW k‖²
    is the output change at an average key: the shift avoids what every text's keys use.
    """
    with torch.autocast(gram.device.type, enabled=False):  # see normal_terms: never a bf16 solve
        dtype = _solve_dtype(gram.dtype, cross.dtype)
        gram, cross = gram.to(dtype), cross.to(dtype)
        return torch.linalg.solve(_regularised(gram, log_lambda, ridge), cross.T).T


def solve_in_span(gram: Tensor, cross: Tensor, log_lambda: Tensor, basis: Tensor, ridge: Tensor | None = None) -> Tensor:
    """`solve_shift`'s least-squares problem with ΔW's rows restricted to the span of `basis` [n, d_in]
    (the networks' pseudo keys ũ): ΔWᵀ = Q (Qᵀ(KᵀK + e^λ R)Q)⁻¹ QᵀKᵀD, Q an orthonormal basis of that
    span. The fit is still read at the real keys (gram, cross as in `solve_shift`); what the networks
    choose is the update's directions, as MEND's rank-1 steps δ̃ ũᵀ do — for one edit and a small λ
    it is MEND's step η δ̃ ũᵀ itself, for many it resolves their interference at the keys the layer
    reads. With n ≥ d_in independent pseudo keys it is `solve_shift`."""
    with torch.autocast(gram.device.type, enabled=False):  # never a bf16 solve (normal_terms)
        dtype = _solve_dtype(gram.dtype, cross.dtype, basis.dtype)
        gram, cross = gram.to(dtype), cross.to(dtype)
        q, _ = torch.linalg.qr(basis.to(dtype).T)  # [d_in, min(n, d_in)], orthonormal columns
        reduced = q.T @ _regularised(gram, log_lambda, ridge) @ q
        return (q @ torch.linalg.solve(reduced, q.T @ cross.T)).T


SolveMode = Literal["per_layer", "joint", "pseudo_span"]


def solve_joint(keys: Sequence[Tensor], values: Tensor, log_lambdas: Tensor,
                ridges: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """ΔW_ℓ [d_out, d_in_ℓ] for every layer ℓ from one least-squares problem over all layers at once:
    min ‖Σ_ℓ K_ℓ ΔW_ℓᵀ − V‖² + Σ_ℓ e^{λ_ℓ} tr(ΔW_ℓ R_ℓ ΔW_ℓᵀ), keys [rows, d_in_ℓ] per layer (the
    same rows: row t is one position read at every layer), values V [rows, d_out] the total shift
    wanted at each row (the layers write into one residual stream), R_ℓ = I unless `ridges` gives it.

    Per-layer solves give each layer's keys the whole of its value shift, so each layer must fit every
    row in its own d_in dimensions: with more rows than that (1000 edits × ~2 answer tokens against
    SmolLM2's 1536, session 49) no layer can, and the per-layer fits sum to a poor one. Here the rows
    are fitted in Σ_ℓ d_in dimensions. By the push-through identity the solution is
    ΔW_ℓᵀ = Λ_ℓ⁻¹ K_ℓᵀ α, α = (Σ_m K_m Λ_m⁻¹ K_mᵀ + I)⁻¹ V, Λ_ℓ = e^{λ_ℓ} R_ℓ: one rows × rows solve."""
    with torch.autocast(values.device.type, enabled=False):  # never a bf16 solve (normal_terms)
        dtype = _solve_dtype(values.dtype, *(k.dtype for k in keys))
        reads: list[Tensor] = []  # Λ_ℓ⁻¹ K_ℓᵀ [d_in_ℓ, rows]
        gram = torch.eye(values.shape[0], dtype=dtype, device=values.device)
        for i, k in enumerate(keys):
            k = k.to(dtype)
            r = None if ridges is None else ridges[i]
            read = (k.T if r is None else torch.linalg.solve(r.to(dtype), k.T)) * (-log_lambdas[i]).exp().to(dtype)
            reads.append(read)
            gram = gram + k @ read
        alpha = torch.linalg.solve(gram, values.to(dtype))
        return [(read @ alpha).T for read in reads]


def _regularised(gram: Tensor, log_lambda: Tensor, ridge: Tensor | None) -> Tensor:
    """KᵀK + e^λ R (R = I unless `ridge`), in gram's dtype: the left side of every per-layer solve."""
    reg = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) if ridge is None else ridge.to(gram.dtype)
    return gram + log_lambda.exp().to(gram.dtype) * reg


def _solve_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 where an input is (exact checks): never below float32."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def normal_terms(k: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """(KᵀK, DᵀK) from keys k [rows, d_in] and value shifts d [rows, d_out], in float32 at least and
    outside autocast. Under bf16 autocast (trainer.precision=bf16-mixed, chosen where the CPU or GPU
    computes bf16 natively) the products would be bf16, whose 8-bit mantissa loses the small
    eigenvalues of KᵀK that the solve divides by: on keys with one shared direction (400 × 1536) the
    solved ΔW was off the float64 one by 26 times its norm (session 42), and training learned against
    that noise."""
    with torch.autocast(k.device.type, enabled=False):
        dtype = _solve_dtype(k.dtype, d.dtype)
        k, d = k.to(dtype), d.to(dtype)
        return k.T @ k, d.T @ k


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "not enough memory")))


class MALMENEditor(MENDEditor):
    """MEND's shared networks map each kept position's (u_t, δ_t) to (ũ_t, δ̃_t); per inner layer ℓ,
    K stacks the keys u_t — the layer's real inputs (rows × d_in) — and D the value shifts
    d_t = η_ℓ (u_t·ũ_t) δ̃_t (rows × d_out), the output change MEND's step η_ℓ δ̃_t ũ_tᵀ would make at
    u_t, and ΔW_ℓ = Dᵀ K (KᵀK + e^{λ_ℓ} I)⁻¹, W' = W − ΔW (descent, MEND's sign), λ_ℓ and η_ℓ learned:
    the one shift that gives every edit's key its value shift at once. (Solving with the pseudo
    keys ũ instead fits a map the layer never sees: the layer reads u.)

    KᵀK and DᵀK are sums over rows, so they are accumulated over chunks of `chunk_size` edits (one
    base forward/backward and one network pass per chunk): at edit time memory scales with the
    chunk, not with the number of edits. Training splits the gradient at ΔW: the outer loss is
    differentiated w.r.t. the edited weights only (chunk by chunk, each chunk's base graph freed at
    once), then ∂L/∂ΔW is carried back through the solve and the networks in one backward.

    Args (besides MEND's):
        lambda_init: initial log-regulariser λ_ℓ (e^λ is added to KᵀK's diagonal).
        chunk_size: edits per chunk (base forward/backward, network pass, outer-loss pass).
        memory_cap_mb: if set, a chunk whose key/value buffers (with their autograd graph when
            training) would exceed this many MB is refused with a MetaEditError naming chunk_size.
        key_covariance: None (the paper's) regularises the solve with e^λ I; ρ > 0 with e^λ R,
            R = (C + ρ·mean(diag C)·I) scaled to mean diagonal 1 and C = E[k kᵀ] the layer's key second
            moment over generic text (`stats`, as MEND's key_whitening; MLP output projections only).
            The penalty is then the output change at an average key rather than ‖ΔW‖² (MEMIT's
            trade-off), so neighbours, whose keys share the common directions, move less.
        stats: how C is estimated (metaedit.locate.stats.StatsSpec).
        lambda_lr: the outer optimizer's learning rate for the log-regularisers λ_ℓ (None: the
            trainer's). Adam moves a parameter by about its learning rate per step: at the networks'
            3e-4, λ moved by ±0.02 in 600 steps on SmolLM2 (session 25), i.e. it stayed at lambda_init.
        edit_steps: solves per edit at edit time (training learns one): each further solve reads every
            edit's key and gradient on the model the earlier ones edited; it stops once every edit's
            target is the greedy answer.
        preserve: None, or where preserved facts come from (metaedit.editors.preserve): the
            solve also fits the keys of the training split's true facts nearest each edit's keys to
            a zero shift, with weight μ, so that what it writes for one subject spares its neighbours.
        keep_earlier: μ_E ≥ 0, for sequential editing (`edit_sequential`, protocol=sequential): the
            solve of each step also fits the keys of the sequence's earlier steps to a zero shift with
            weight μ_E — the model already maps them to their edited values, so a later edit that
            leaves them alone keeps the earlier ones (AlphaEdit keeps its earlier keys for the same
            reason). 0 (the paper's): every step's solve sees only its own edits. Lifelong training
            (method.loss.lifelong) keeps them over its training sequences the same way.
        solve: "per_layer" (the paper's): each layer's ΔW_ℓ fits its own value shifts D_ℓ in its d_in
            dimensions; "joint": one solve over all layers' keys side by side fits the rows' total
            shift Σ_ℓ D_ℓ (`solve_joint`), room for Σ_ℓ d_in rows instead of d_in — what many edits at
            a narrow layer need. Preserved facts and kept earlier keys join it as rows fitted to zero.
            "pseudo_span": the per-layer problem with ΔW_ℓ's rows in the span of the networks' pseudo
            keys ũ (`solve_in_span`): the networks choose the update's directions, as MEND's, and the
            solve still fits the real keys (a key the layer reads only near a pseudo key's direction,
            a neighbour's, then moves only as far as that direction reaches it).
        calibrate: None, or p in (0, 1), edit time only (per_layer solves): each edit's value shifts
            (all its rows, every layer) get their own scale a_i in [1/16, calibrate_max], the smallest at which
            the edited model gives its own target a mean token probability ≥ p, found by bisection on
            log a over `calibrate_steps` solves of the same normal equations (no further forward or
            backward through the networks, one forward over the edit prompts per step). The networks'
            one-step shifts overshoot some edits by far and miss others; an overshoot reaches the
            edit's neighbours, whose keys share its template, in proportion (`calibrated_shifts`).
        calibrate_steps: bisection steps of `calibrate`.
        calibrate_max: the top of the bracket: the scale an edit gets that reaches p at no scale tried
            (1: calibration only shrinks the networks' shifts).
        rephrase: None, or {data: DIR, per_edit: k} (metaedit.editors.rephrase), edit time only: each
            edit is also written, as further edits, in up to k phrasings of its relation that DIR's
            training split uses (its subject and target in them), so the solve fits those keys too.
        inner_weight: w > 0 (rows=target): the rows inside each answer (they read the new object's own
            tokens, as a neighbour scored on that object does) count w times in the solve against the
            row that predicts the answer; 1 is rows=target, w → 0 approaches rows=answer.
        max_shift: None, or c > 0: each solve's ΔW_ℓ is scaled down to at most c·‖W_ℓ‖ (in training too)
            (Frobenius, W_ℓ the weights it is applied to). A guard for long sequences: there an
            edited block's larger outputs make larger keys at the blocks above, whose solves then
            make larger shifts (session 44: a sequence of 10-edit steps diverged within 6–30 steps).
    """

    method = "malmen"

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        rank: int = 1920,
        edit_lr: float = 1e-1,
        rows: RowsMode | Sequence[RowsMode] = "nonpad",
        n_blocks: int = 2,
        act: str = "gelu",
        lambda_init: float = 0.0,
        chunk_size: int = 64,
        memory_cap_mb: float | None = None,
        edit_lr_lr: float | None = None,
        edit_scale: float = 1.0,
        edit_contrast: float = 0.0,
        transform_delta: bool = True,
        key_covariance: float | None = None,
        stats: StatsSpec | dict[str, Any] | None = None,
        lambda_lr: float | None = None,
        edit_steps: int = 1,
        preserve: PreserveSpec | dict[str, Any] | None = None,
        keep_earlier: float = 0.0,
        max_shift: float | None = None,
        solve: SolveMode = "per_layer",
        calibrate: float | None = None,
        calibrate_steps: int = 6,
        calibrate_max: float = 2.0,
        rephrase: RephraseSpec | dict[str, Any] | None = None,
        inner_weight: float = 1.0,
    ) -> None:
        if lambda_lr is not None and not lambda_lr > 0:
            raise MetaEditError(f"{self.method} lambda_lr must be > 0 or null, got {lambda_lr}")
        if not keep_earlier >= 0:
            raise MetaEditError(f"{self.method} keep_earlier must be >= 0, got {keep_earlier}")
        if max_shift is not None and not max_shift > 0:
            raise MetaEditError(f"{self.method} max_shift must be > 0 or null, got {max_shift}")
        if solve not in ("per_layer", "joint", "pseudo_span"):
            raise MetaEditError(f"{self.method} solve must be 'per_layer', 'joint' or 'pseudo_span', got {solve!r}")
        if calibrate is not None and not 0 < calibrate < 1:
            raise MetaEditError(f"{self.method} calibrate must be a probability in (0, 1) or null, got {calibrate}")
        if calibrate is not None and solve != "per_layer":
            raise MetaEditError(f"{self.method} calibrate needs solve=per_layer (it rescales each edit's rows in the "
                                f"per-layer normal equations), got solve={solve!r}")
        if not inner_weight > 0:
            raise MetaEditError(f"{self.method} inner_weight must be > 0, got {inner_weight}")
        if calibrate_steps < 1:
            raise MetaEditError(f"{self.method} calibrate_steps must be >= 1, got {calibrate_steps}")
        if not calibrate_max > 1 / 16:
            raise MetaEditError(f"{self.method} calibrate_max must be > 1/16 (the bracket's bottom), got {calibrate_max}")
        # edit_contrast / transform_delta act on MEND's capture and networks, which MALMEN reuses.
        super().__init__(model, inner_params, rank=rank, edit_lr=edit_lr, rows=rows, n_blocks=n_blocks, act=act,
                         edit_lr_lr=edit_lr_lr, chunk_size=chunk_size, edit_scale=edit_scale,
                         edit_steps=edit_steps, edit_contrast=edit_contrast, transform_delta=transform_delta)
        self.lambda_init, self.memory_cap_mb, self.lambda_lr = lambda_init, memory_cap_mb, lambda_lr
        self.log_lambdas = nn.Parameter(torch.full((len(self.inner_params),), float(lambda_init)))
        # The same statistics as MEND's key whitening, used as the solve's regulariser instead.
        self.covariance = KeyWhitening(self.method, model, inner_params, key_covariance, stats, option="key_covariance")
        modes = set(self.layer_rows)
        if inner_weight != 1.0 and modes != {"target"}:
            raise MetaEditError(f"{self.method} inner_weight weighs the rows inside the answer (rows=target); "
                                f"got rows={rows!r}")
        self.preserve = PreservedKeys(model, self.inner_params, preserve)
        if self.preserve.enabled and not any(self._answer_layers):
            raise MetaEditError(f"{self.method} preserve needs rows=target, answer or nonpad on some layer (the bank's "
                                f"keys are the answer positions'), got rows={rows!r}")
        self.keep_earlier = float(keep_earlier)
        self.max_shift = None if max_shift is None else float(max_shift)
        widths = {(p.d_out, p.side) for p in self.inner_params}
        if solve == "joint" and not modes <= {"target", "answer"}:
            # Its rows are positions read at every layer; other modes drop a position wherever its
            # gradient vanishes (nonpad: after the answer in the last blocks; subject rows there too).
            raise MetaEditError(f"{self.method} solve=joint needs rows=target or answer (the same answer-predicting "
                                f"positions at every layer), got rows={rows!r}")
        if solve == "joint" and len(widths) > 1:
            # The joint fit adds the layers' output changes: they must write into one space.
            raise MetaEditError(f"{self.method} solve=joint needs inner parameters that write into one space (the "
                                f"residual stream: e.g. every block's mlp.down_proj); got outputs of widths "
                                f"{sorted(w for w, _ in widths)} — use solve=per_layer or other inner_params")
        self.solve: SolveMode = solve
        self.calibrate = None if calibrate is None else float(calibrate)
        self.calibrate_steps, self.calibrate_max = int(calibrate_steps), float(calibrate_max)
        self.calibrated_scales: Tensor | None = None  # the last calibrated edit's a_i
        self.rephrase = TrainingRephrases(rephrase)
        self.inner_weight = float(inner_weight)
        # The sequence's earlier steps, per inner layer (float32): Σ KᵀK for per-layer solves, the keys
        # themselves [rows, d_in] for the joint one (its rows are positions read at every layer).
        self.earlier: list[Tensor] = []

    @property
    def _answer_layers(self) -> list[bool]:
        """Per inner layer: does it read answer positions? The bank holds answer-position keys, which a
        subject row's key is not comparable to, so a layer with subject rows gets no bank rows (nor swaps)."""
        return [m in ("target", "answer", "nonpad") for m in self.layer_rows]

    def hparams(self) -> dict[str, Any]:
        # MEND's key_whitening (with its stats) is not MALMEN's: its update is a least-squares solve
        # over the layer's real keys, whose regulariser may use the statistics.
        mend = {k: v for k, v in super().hparams().items() if k not in ("key_whitening", "stats")}
        return {**mend, "lambda_init": self.lambda_init, "memory_cap_mb": self.memory_cap_mb,
                "key_covariance": self.covariance.rho, "stats": self.covariance.stats.to_dict(), "lambda_lr": self.lambda_lr,
                "preserve": None if self.preserve.spec is None else self.preserve.spec.to_dict(),
                "keep_earlier": self.keep_earlier, "max_shift": self.max_shift, "solve": self.solve,
                "calibrate": self.calibrate, "calibrate_steps": self.calibrate_steps, "calibrate_max": self.calibrate_max,
                "rephrase": None if self.rephrase.spec is None else self.rephrase.spec.to_dict(),
                "inner_weight": self.inner_weight}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        # MEND's groups without λ, and λ in its own (no weight decay: it would pull λ towards 0, i.e.
        # e^λ towards 1, a value with no meaning here).
        groups = [{**g, "params": [p for p in g["params"] if p is not self.log_lambdas]} for g in super().param_groups(lr)]
        return [*groups, {"params": [self.log_lambdas], "lr": lr if self.lambda_lr is None else self.lambda_lr,
                          "weight_decay": 0.0}]

    def prepare(self) -> None:
        """The key statistics, when key_covariance is on (computed once per base model, then cached),
        and the preserved facts' keys, when preserve is on (read once per model and data, then cached)."""
        super().prepare()
        self.covariance.prepare(self, inverse=False)
        self.preserve.prepare(self)

    def state_to_log(self) -> dict[str, Tensor | float]:
        # MEND's step sizes, and the learned regularisers: e^λ against KᵀK's scale says whether the
        # solve fits every key (small λ) or has become a summed MEND update (large λ).
        lam = self.log_lambdas.detach()
        return {**super().state_to_log(), "log_lambda_mean": lam.mean(), "log_lambda_min": lam.min(),
                "log_lambda_max": lam.max()}

    # ---- sequences: the earlier steps' keys (keep_earlier) ----------------------------------------
    @property
    def _keeps_earlier(self) -> bool:
        # In training, a lifelong sequence (the trainer resets it at each sequence's start) keeps its
        # steps' keys as an edit-time sequence does, so the editor learns the solve it will face there.
        return self.keep_earlier > 0 and self._in_sequence

    def reset_sequence(self) -> None:
        self.earlier = []

    @property
    def _earlier_name(self) -> str:
        return "earlier_keys" if self.solve == "joint" else "earlier"

    def sequence_state(self) -> dict[str, Tensor]:
        return {f"{self._earlier_name}.{i}": g for i, g in enumerate(self.earlier)}

    def load_sequence_state(self, state: Mapping[str, Tensor]) -> None:
        expected = {f"{self._earlier_name}.{i}" for i in range(len(self.inner_params))}
        if state and set(state) != expected:
            raise MetaEditError(f"{self.method}: a saved sequence holds {sorted(state)[:3]}...; this editor keeps "
                                f"{self._earlier_name}.0..{len(self.inner_params) - 1}")
        self.earlier = [state[f"{self._earlier_name}.{i}"].float() for i in range(len(self.inner_params))] if state else []

    # ---- the least-squares shift ----------------------------------------------------------------
    def _check_memory(self, rows: Sequence[tuple[Tensor, Tensor]], held: float) -> float:
        """MB of this chunk's K/D rows (×(3 + 4·n_blocks) when an autograd graph keeps the networks'
        activations for the backward, which then lives until the step's end); raises past the cap.
        The joint and span solves keep every chunk's rows (keys, or pseudo keys) until they solve, so they add up there too."""
        graph = 3 + 4 * self.n_blocks if torch.is_grad_enabled() else 1
        mb = sum(u.shape[0] * (u.shape[1] + d.shape[1]) for u, d in rows) * 4 * graph / 2**20
        total = held + mb if torch.is_grad_enabled() or self.solve != "per_layer" else mb
        if self.memory_cap_mb is not None and total > self.memory_cap_mb:
            raise MetaEditError(
                f"malmen: the keys and value shifts need ~{total:.0f} MB (memory_cap_mb={self.memory_cap_mb}); "
                f"lower method.editor.chunk_size (now {self.chunk_size})"
                + (" or the edits per training step (data.n_edits)" if torch.is_grad_enabled() else ""))
        return total

    @contextmanager
    def _chunk_memory(self) -> Iterator[None]:
        """Running out of memory on a chunk is a MetaEditError naming the chunk setting."""
        try:
            yield
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise MetaEditError(
                f"malmen ran out of memory on a chunk of {self.chunk_size} edits; lower "
                f"method.editor.chunk_size{' or data.n_edits' if torch.is_grad_enabled() else ''} ({e})") from None

    def key_value_rows(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                       params: Mapping[str, Tensor] | None = None, avoid: Sequence[str] = (),
                       owners: list[list[Tensor]] | None = None,
                       ) -> Iterator[tuple[list[tuple[Tensor, Tensor]], list[Tensor], list[Tensor]]]:
        """Per chunk of `chunk_size` edits: (keys K, value shifts D) per inner layer, read on the model with
        `params` (None: the base), with `preserve` the bank rows nearest each layer's keys (never
        facts that name an edited subject or whose prompt is in `avoid`; empty without preserve), and
        the networks' pseudo keys ũ per layer. `owners`, when given, receives per chunk and layer the
        edit (row of `edit`) each key belongs to."""
        held = 0.0
        start = 0
        excluded = None
        if self.preserve.enabled:
            self.preserve.prepare(self)
            excluded = self.preserve.excluded_rows([r.subject for r in requests or ()],
                                                   [*(edit.prompts or ()), *avoid])
        for part, part_requests in self.chunks(edit, requests):
            with self._chunk_memory():
                # Only when asked or weighing the inner rows: per-row work.
                chunk_owners: list[Tensor] | None = None if owners is None and self.inner_weight == 1.0 else []
                rows = self.capture(part, part_requests, params, chunk_owners)
                if owners is not None and chunk_owners is not None:
                    owners.append([o + start for o in chunk_owners])
                start += len(part)
                held = self._check_memory(rows, held)
                nearest = [] if excluded is None else [
                    self.preserve.nearest(i, k, excluded) if answers else k.new_zeros(0, dtype=torch.long)
                    for i, ((k, _), answers) in enumerate(zip(rows, self._answer_layers))]
                pairs = self.transform(rows)
                # The keys are the layer's real inputs u (it is at u that W' is read), the value
                # shifts d = η (u·ũ) δ̃: the change MEND's rank-1 step η δ̃ ũᵀ makes at its own key.
                kd = [(k, (self.step_size(i) * (k * k_tilde).sum(-1, keepdim=True)) * d_tilde)
                      for i, ((k, _), (k_tilde, d_tilde)) in enumerate(zip(rows, pairs))]
                if self.inner_weight != 1.0 and chunk_owners is not None:
                    kd = [self._weigh_inner(k, d, o) for (k, d), o in zip(kd, chunk_owners)]
            yield kd, nearest, [k_tilde for k_tilde, _ in pairs]

    def _weigh_inner(self, k: Tensor, d: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """K and D with the rows inside each answer (all but an edit's first kept row, the one that
        predicts the answer's first token) scaled by √inner_weight: they then count inner_weight times in
        the least squares. Rows of one edit are consecutive and in position order (capture)."""
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]
        scale = torch.where(first, 1.0, self.inner_weight ** 0.5).to(k.dtype)[:, None]
        return k * scale, d * scale.to(d.dtype)

    def normal_equations(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                         params: Mapping[str, Tensor] | None = None, avoid: Sequence[str] = (),
                         edit_grams: list[Tensor] | None = None,
                         pseudo_keys: list[list[Tensor]] | None = None,
                         edit_rows: list[list[tuple[Tensor, Tensor, Tensor]]] | None = None) -> list[tuple[Tensor, Tensor]]:
        """(KᵀK, DᵀK) per inner layer, summed over chunks (`key_value_rows`). With `preserve`,
        KᵀK + μ K_PᵀK_P: the preserved facts' keys nearest the edits' (+ μ_S K_SᵀK_S, the edits' subject
        swaps, `PreserveSpec.swaps`); in a sequence with keep_earlier,
        + μ_E Σ K_EᵀK_E of the earlier steps. `edit_grams`, when given, receives the edits' own KᵀK per
        layer (without those terms); `pseudo_keys`, when given, one list per layer of the chunks' ũ;
        `edit_rows`, when given, per chunk and layer the rows themselves (K, D, the edit of each row)."""
        sums: list[tuple[Tensor, Tensor] | None] = [None] * len(self.inner_params)
        preserved: list[list[Tensor]] = [[] for _ in self.inner_params]
        owners: list[list[Tensor]] | None = None if edit_rows is None else []
        for kd, nearest, tilde in self.key_value_rows(edit, requests, params, avoid, owners):
            if pseudo_keys is not None:
                pseudo_keys.append(tilde)
            if edit_rows is not None and owners is not None:
                edit_rows.append([(k, d, o) for (k, d), o in zip(kd, owners[-1])])
            for i, rows in enumerate(nearest):
                preserved[i].append(rows)
            with self._chunk_memory():
                for i, (k, d) in enumerate(kd):
                    gram, cross = normal_terms(k, d)
                    prev = sums[i]
                    sums[i] = (gram, cross) if prev is None else (prev[0] + gram, prev[1] + cross)
        out = [s for s in sums if s is not None]
        if edit_grams is not None:
            edit_grams.extend(g for g, _ in out)
        if self.preserve.enabled:
            out = [(g + self.preserve.gram(i, torch.cat(preserved[i])).to(g.dtype), c) if answers and preserved[i] else (g, c)
                   for i, ((g, c), answers) in enumerate(zip(out, self._answer_layers))]
            swapped = self.preserve.swap_grams(self, requests or (), params, avoid)
            if swapped is not None:  # the edits' templates with other subjects, fitted to zero
                out = [(g + sg.to(g.dtype), c) if answers else (g, c)
                       for (g, c), sg, answers in zip(out, swapped, self._answer_layers)]
        if self._keeps_earlier and self.earlier:
            out = [(g + self.keep_earlier * e.to(g.device, g.dtype), c) for (g, c), e in zip(out, self.earlier)]
        return out

    def joint_shifts(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                     params: Mapping[str, Tensor] | None = None, avoid: Sequence[str] = (),
                     edit_keys: list[Tensor] | None = None) -> list[Tensor]:
        """ΔW_ℓ for every inner layer from one solve over all layers (`solve_joint`): the edit rows fit
        Σ_ℓ D_ℓ; preserved facts (the union over layers of the bank rows nearest each layer's keys,
        each read at every layer, weight μ) and, in a sequence with keep_earlier, the earlier steps'
        keys (weight μ_E) join as rows fitted to zero. `edit_keys`, when given, receives the edits' keys."""
        keys: list[list[Tensor]] = [[] for _ in self.inner_params]
        values: list[Tensor] = []
        preserved: list[Tensor] = []
        for kd, nearest, _ in self.key_value_rows(edit, requests, params, avoid):
            preserved.extend(nearest)
            for i, (k, _) in enumerate(kd):
                keys[i].append(k)
            values.append(torch.stack([d.to(_solve_dtype(d.dtype)) for _, d in kd]).sum(0))
        stacked = [torch.cat(k) for k in keys]
        if len({k.shape[0] for k in stacked}) > 1:
            raise MetaEditError(f"{self.method} solve=joint: the inner layers kept different numbers of answer rows "
                                f"({[k.shape[0] for k in stacked]}; a position whose key or gradient is exactly zero "
                                f"at some layer) — use solve=per_layer")
        if edit_keys is not None:
            edit_keys.extend(stacked)
        zeros: list[list[Tensor]] = [[] for _ in self.inner_params]
        if preserved:
            bank_rows = torch.cat(preserved).unique()
            for i in range(len(self.inner_params)):
                zeros[i].append(self.preserve.scaled_keys(i, bank_rows))
        swapped = self.preserve.swap_keys(self, requests or (), params, avoid) if self.preserve.enabled else None
        for i, k in enumerate(swapped or ()):
            zeros[i].append(k)
        if self._keeps_earlier and self.earlier:
            for i, e in enumerate(self.earlier):
                zeros[i].append(self.keep_earlier ** 0.5 * e)
        dtype = _solve_dtype(stacked[0].dtype)  # float32, or float64 in exact checks
        rows = [torch.cat([k.to(dtype), *(z.to(k.device, dtype) for z in extra)]) for k, extra in zip(stacked, zeros)]
        target = torch.cat(values)
        target = torch.cat([target, target.new_zeros(rows[0].shape[0] - target.shape[0], target.shape[1])])
        ridges = self.covariance.covariances(self, rows[0]) if self.covariance.enabled else None
        return solve_joint(rows, target, self.log_lambdas, ridges)

    def weight_shifts(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                      params: Mapping[str, Tensor] | None = None, avoid: Sequence[str] = (),
                      edit_grams: list[Tensor] | None = None) -> list[Tensor]:
        """ΔW_ℓ [d_out, d_in] for every inner layer (differentiable w.r.t. networks, η, λ). `edit_grams`
        receives what a sequence keeps of this step (the edits' KᵀK per layer, or their keys when joint)."""
        if self.solve == "joint":
            return self.joint_shifts(edit, requests, params, avoid, edit_grams)
        chunks: list[list[Tensor]] | None = [] if self.solve == "pseudo_span" else None
        sums = self.normal_equations(edit, requests, params, avoid, edit_grams, chunks)
        ridges = self.covariance.covariances(self, sums[0][0]) if self.covariance.enabled else [None] * len(sums)
        if chunks is not None:
            bases = [torch.cat([c[i] for c in chunks]) for i in range(len(sums))]
            return [solve_in_span(g, c, self.log_lambdas[i], b, r)
                    for i, ((g, c), b, r) in enumerate(zip(sums, bases, ridges))]
        return [solve_shift(g, c, self.log_lambdas[i], r) for i, ((g, c), r) in enumerate(zip(sums, ridges))]

    def calibrated_shifts(self, edit: LMBatch, requests: Sequence[EditRequest] | None = None,
                          edit_grams: list[Tensor] | None = None) -> list[Tensor]:
        """`weight_shifts` (per_layer) with edit i's value shifts D_i scaled by its own a_i (`calibrate`):
        DᵀK = Σ_i a_i D_iᵀK_i, the left side KᵀK + μK_PᵀK_P + e^λR unchanged (preserved facts and kept
        earlier keys stay fitted to zero), so the rows are read and each layer's system factored once
        and every bisection step is a back-substitution and one forward over the edit prompts. a_i is
        the upper end of edit i's bracket: the smallest scale tried at which its target reached
        probability p, or the bracket's top (calibrate_max) where none did."""
        if self.calibrate is None:
            raise MetaEditError(f"{self.method}: calibrated_shifts needs calibrate=p (the target probability)")
        floor = math.log(self.calibrate)
        rows: list[list[tuple[Tensor, Tensor, Tensor]]] = []
        with torch.no_grad():
            sums = self.normal_equations(edit, requests, edit_grams=edit_grams, edit_rows=rows)
            ridges = self.covariance.covariances(self, sums[0][0]) if self.covariance.enabled else [None] * len(sums)
            layers = []
            for i, ((gram, _), ridge) in enumerate(zip(sums, ridges)):
                dtype = _solve_dtype(gram.dtype)
                with torch.autocast(gram.device.type, enabled=False):  # never a bf16 solve (normal_terms)
                    lu = torch.linalg.lu_factor(_regularised(gram.to(dtype), self.log_lambdas[i], ridge))
                k, d, owner = (torch.cat([c[i][j] for c in rows]) for j in range(3))
                layers.append((lu, k.to(dtype), d.to(dtype), owner))

            def shifts_at(log2_scale: Tensor) -> list[Tensor]:
                out = []
                for lu, k, d, owner in layers:
                    scale = torch.exp2(log2_scale).to(d.device, d.dtype)[owner.to(d.device)]
                    with torch.autocast(k.device.type, enabled=False):
                        out.append(torch.linalg.lu_solve(*lu, k.T @ (d * scale[:, None])).T)
                return out

            top = math.log2(self.calibrate_max)
            lo = torch.full((len(edit),), -4.0)  # a in [1/16, calibrate_max]: the networks' own scale is 1
            hi = torch.full((len(edit),), top)
            for _ in range(self.calibrate_steps):
                mid = (lo + hi) / 2
                edited = self.shifted(self.bounded(shifts_at(mid)))
                reached = torch.cat([mean_target_logprob(edited.logits(part), part.targets).cpu()
                                     for part, _ in self.chunks(edit, None)]) >= floor
                hi, lo = torch.where(reached, mid, hi), torch.where(reached, lo, mid)
            self.calibrated_scales = torch.exp2(hi)  # what each edit got (diagnostics, tests)
            a = self.calibrated_scales
            log.info("calibrate p=%g: edit scales min %.3g median %.3g max %.3g; %d of %d short of p at the top (%g)",
                     self.calibrate, a.min(), a.median(), a.max(), int((hi >= top).sum()), len(a), self.calibrate_max)
            return shifts_at(hi)

    def shifted(self, shifts: Sequence[Tensor], start: Mapping[str, Tensor] | None = None) -> EditedModel:
        """The model with W' = W − ΔW on every inner layer, W the base's weights or `start`'s (Conv1D
        stores W as [d_in, d_out])."""
        params = {}
        for p, shift in zip(self.inner_params, shifts):
            w = self.model.get_parameter(p.name) if start is None else start[p.name]
            shift = shift.to(w.dtype)
            params[p.name] = w - (shift.T if p.transposed else shift)
        return EditedModel(self.model, params)

    def bounded(self, shifts: Sequence[Tensor], start: Mapping[str, Tensor] | None = None) -> list[Tensor]:
        """`shifts` with each ΔW_ℓ scaled down to at most max_shift·‖W_ℓ‖ (unchanged when max_shift is None).
        The scale is a constant of the graph: in training the gradient reaches the shift scaled by it."""
        if self.max_shift is None:
            return list(shifts)
        out = []
        for p, shift in zip(self.inner_params, shifts):
            w = self.model.get_parameter(p.name) if start is None else start[p.name]
            limit = self.max_shift * w.detach().float().norm()
            norm = shift.detach().float().norm().clamp_min(limit).clamp_min(torch.finfo(torch.float32).tiny)
            out.append(shift * (limit / norm).to(shift.dtype))  # (a zero W allows no shift, not 0/0)
        return out

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        # Meta-training learns one solve. edit_steps > 1 (an edit-time choice, as MEND's) solves again
        # on the edited model: every edit's key and gradient are read anew there, so an edit that
        # landed (small gradient, small value shift) holds its fit while the others get another shift
        # — MEMIT's value shifts are ~15 such steps on one layer, MALMEN's one.
        if self.rephrase.enabled and not self.training:  # edit time only: the rephrasings join as edits
            requests = [*requests, *self.rephrase.expand(requests)]
            assert self.formatter is not None
            edit = self.formatter.batch([r.prompt for r in requests], [r.target for r in requests]).to(self.device)
        grams: list[Tensor] | None = [] if self._keeps_earlier else None
        calibrated = self.calibrate is not None and not self.training  # edit time only
        shifts = self.calibrated_shifts(edit, requests, grams) if calibrated else self.weight_shifts(edit, requests, edit_grams=grams)
        edited = self.shifted(self.bounded(shifts))
        for _ in range(1, 1 if self.training else self.edit_steps):
            with torch.no_grad():
                if exact_correct(edited.logits(edit), edit.targets).all():
                    break
            edited = self.shifted(self.bounded(self.weight_shifts(edit, requests, edited.params), edited.params),
                                  edited.params)
        self._keep(grams)
        return edited

    def _keep(self, grams: list[Tensor] | None) -> None:
        """This step's keys (KᵀK per layer, or the keys when joint, read on the model the earlier steps
        edited) join the kept ones."""
        if grams is None:
            return
        grams = [g.detach().float() for g in grams]
        if not self.earlier:
            self.earlier = grams
        elif self.solve == "joint":  # keys: the earlier rows and this step's
            self.earlier = [torch.cat([e, g.to(e.device)]) for e, g in zip(self.earlier, grams)]
        else:
            self.earlier = [e + g for e, g in zip(self.earlier, grams)]

    # ---- decoupled meta-training ----------------------------------------------------------------
    def training_loss_and_backward(
        self,
        batch: EditBatch,
        objective: Callable[..., tuple[Tensor, dict[str, Tensor]]],
        backward: Callable[..., None],
    ) -> dict[str, Tensor]:
        # (1) ΔW with a graph into the networks only: the base ran forward/backward per chunk to give
        #     the constants (u, δ); no graph through it is kept.
        # The prompts the outer loss scores are never preserved (they stand for unseen neighbours).
        grams: list[Tensor] | None = [] if self._keeps_earlier else None
        shifts = self.bounded(self.weight_shifts(batch.edit, batch.requests,
                                                 avoid=[*batch.inscope_prompts, *batch.loc_prompts], edit_grams=grams))
        # (2) The outer loss on W − ΔW with ΔW a leaf: each chunk's base graph ends at the leaf and is
        #     freed by its backward, so only one chunk's activations live at a time. Chunks are
        #     weighted by their share of the edits (their losses are means over their own tokens).
        leaves = [s.detach().requires_grad_(True) for s in shifts]
        edited = self.shifted(leaves)
        logs: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        for part in batch.split(self.chunk_size):
            share = part.n_edits / batch.n_edits
            loss, part_logs = objective(part, edited)
            torch.autograd.backward(share * loss, inputs=leaves)
            total = total + share * loss.detach()
            for k, v in part_logs.items():
                logs[k] = logs.get(k, 0) + share * v.detach().float()
        # (3) Σ_ℓ ⟨ΔW_ℓ, ∂L/∂ΔW_ℓ⟩ has, w.r.t. every parameter upstream of ΔW, exactly the gradient of L
        #     (a vector-Jacobian product): one backward through the solve and the networks.
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        backward(sum((s * g).sum() for s, g in zip(shifts, grads)), total)
        self._keep(grams)
        logs["loss"] = total
        return logs
