"""The target value: the shift δ of one module's output at the subject's last token that makes the
model produce the new object (ROME §3.1 / MEMIT eq. 16), optimised with a few Adam steps."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaedit.functional import logits_at
from metaedit.hooks import captured, patched_outputs
from metaedit.locate.keys import at_positions
from metaedit.precision import uses_bf16
from metaedit.prefix import frozen_prefix, with_prefix
from metaedit.types import LMBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeltaSettings:
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625  # weight of KL(p_before ‖ p_after) on "{subject} is a" prompts
    weight_decay: float = 0.05  # weight of (‖δ‖ / ‖h‖)², h the residual stream at the subject token
    clamp_norm_factor: float = 1.0  # ‖δ‖ ≤ clamp_norm_factor · ‖h‖
    stop_nll: float = 0.05  # stop once the new object's mean token NLL is below this
    precision: str = "auto"  # forward/backward of the steps: "fp32", "bf16" (autocast), "auto": bf16 where native


def _first_target_column(targets: Tensor) -> Tensor:
    """Per row, the logits position that predicts the first target token (what comes after the prompt)."""
    is_target = targets != -100
    return is_target.float().argmax(-1)


def _row_nll(logp: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Mean NLL of each row's target tokens, averaged over rows (every prompt counts equally,
    whatever its target length). `logp` [n]: the target tokens' log-probabilities, `rows` their rows."""
    per_row = torch.zeros(n_rows, device=logp.device).index_add_(0, rows, -logp)
    count = torch.zeros(n_rows, device=logp.device).index_add_(0, rows, torch.ones_like(logp))
    return (per_row / count.clamp_min(1)).mean()


def optimise_delta(model: nn.Module, module: nn.Module, module_param: str, residual: nn.Module,
                   rewrite: LMBatch, rewrite_positions: Sequence[int], kl: LMBatch | None,
                   kl_positions: Sequence[int], params: Mapping[str, Tensor], settings: DeltaSettings) -> Tensor:
    """δ [d_out] added to `module`'s output at each row's position, so that the `rewrite` rows
    predict their targets, with the next-token distribution after each `kl` prompt kept (KL term),
    ‖δ‖ penalised and clamped relative to the residual stream (`residual`: the block holding
    `module`, whose output is that stream). `params` is the model's current edit (not changed)."""
    batch = rewrite if kl is None else LMBatch.concat([rewrite, kl])
    positions = list(rewrite_positions) + (list(kl_positions) if kl is not None else [])
    n_rw = len(rewrite)
    # Blocks before the edited one are not changed by δ: run them once, replay only the tail.
    batch = with_prefix(frozen_prefix(model, [*params, module_param]), batch)
    device = batch.input_ids.device
    rows = torch.arange(len(positions), device=device)
    pos = torch.as_tensor(positions, device=device)
    # The logits read: every target token of the rewrite rows, then each KL prompt's next token.
    tgt_rows, tgt_cols = (batch.targets[:n_rw] != -100).nonzero(as_tuple=True)
    tgt_ids = batch.targets[tgt_rows, tgt_cols]
    read_rows, read_cols = tgt_rows, tgt_cols
    if kl is not None:
        kl_rows = torch.arange(n_rw, len(batch), device=device)
        read_rows = torch.cat([tgt_rows, kl_rows])
        read_cols = torch.cat([tgt_cols, _first_target_column(batch.targets[n_rw:])])
    n_tgt = len(tgt_rows)

    with torch.no_grad():
        with captured(outputs={"h": residual}) as store:
            logits0 = logits_at(model, batch, read_rows, read_cols, params)
        ref = at_positions(store["h"], positions)[:n_rw].float().norm(dim=-1).mean()
        log_p0 = F.log_softmax(logits0[n_tgt:].float(), -1) if kl is not None else None
        d_out = store["h"].shape[-1]

    delta = torch.zeros(d_out, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    max_norm = settings.clamp_norm_factor * ref

    def add_delta(y: Tensor) -> Tensor:
        # One-hot over (row, position): y + mask ⊗ δ, differentiable in δ, leaves other tokens as they are.
        mask = torch.zeros(y.shape[:-1], device=y.device, dtype=y.dtype)
        mask[rows, pos] = 1
        return y + mask.unsqueeze(-1) * delta.to(y.dtype)

    # bf16 autocast where the hardware has it: the steps are most of an edit's time, δ itself and the
    # losses stay float32 (on a CPU with AVX512-BF16 a step's matmuls run ~2.4x faster).
    bf16 = uses_bf16(settings.precision, device)
    taken, last_nll = 0, float("nan")
    with torch.enable_grad(), patched_outputs({module: add_delta}), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for _ in range(settings.steps):
            logits = logits_at(model, batch, read_rows, read_cols, params)
            logp = F.log_softmax(logits[:n_tgt].float(), -1).gather(-1, tgt_ids.unsqueeze(-1)).squeeze(-1)
            nll = _row_nll(logp, tgt_rows, n_rw)
            last_nll = nll.item()
            loss = nll + settings.weight_decay * (delta.norm() / ref) ** 2
            if kl is not None:
                log_p = F.log_softmax(logits[n_tgt:].float(), -1)
                loss = loss + settings.kl_factor * F.kl_div(log_p, log_p0, log_target=True, reduction="batchmean")
            if last_nll < settings.stop_nll:
                break
            taken += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                norm = delta.norm()
                if norm > max_norm:
                    delta.mul_(max_norm / norm)
    log.debug("delta: %d steps, nll %.3f, |delta|/|h| %.3f", taken, last_nll, (delta.norm() / ref).item())
    return delta.detach()
