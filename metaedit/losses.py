"""Outer-loop losses and per-example correctness on aligned logits/targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    # Half-precision logits are upcast for a stable softmax; float64 stays float64 (finite-difference tests).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def nll(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Token-level negative log-likelihood of `targets` (-100 ignored); mean or sum over tokens."""
    return F.cross_entropy(_upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction=reduction)


def token_kl(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(p_pre ‖ p_post) per position, averaged over positions where `mask` is 1."""
    pre = F.log_softmax(_upcast(pre_logits), dim=-1)
    post = F.log_softmax(_upcast(post_logits), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def exact_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """Per example: is every target token the argmax given the target prefix?

    By induction over positions this is exactly "greedy decoding reproduces the whole target", so
    exact-mode accuracy needs one teacher-forced pass, not a generation loop.
    """
    valid = targets != -100
    hit = (logits.argmax(-1) == targets) | ~valid
    return hit.all(dim=-1)


def token_correct(logits: Tensor, targets: Tensor) -> Tensor:
    """Per example: fraction of target tokens whose teacher-forced argmax is right (EasyEdit's mode)."""
    valid = targets != -100
    hit = (logits.argmax(-1) == targets) & valid
    return hit.sum(-1).float() / valid.sum(-1).clamp_min(1).float()


def rival_logprob(logits: Tensor, targets: Tensor) -> Tensor:
    """Per example: the log-probability of the model's own answer where it first leaves the target —
    the argmax at the first target position (teacher-forced) whose argmax is not the target token —
    or 0 where greedy decoding already gives the whole target. Its gradient points at "make the
    current answer less likely" (MEND's `edit_contrast`); a shared first token ("New Delhi" against
    "New York") moves the comparison to the token where the two answers part."""
    valid = targets != -100
    logp = F.log_softmax(_upcast(logits), dim=-1)
    rival = logp.detach().argmax(-1)
    wrong = valid & (rival != targets)
    at = wrong.float().argmax(-1)  # first position that differs (0 where none: masked out below)
    rows = torch.arange(targets.shape[0], device=targets.device)
    return logp[rows, at, rival[rows, at]] * wrong.any(-1).to(logp.dtype)


def mean_target_logprob(logits: Tensor, targets: Tensor) -> Tensor:
    """Per example: mean per-token log-probability of the target string (CounterFact's comparison)."""
    valid = targets != -100
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def nll_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: summed target-token NLL and the number of target tokens. Σ sums / Σ counts over
    any partition of the rows is `nll(..., "mean")` of all of them (metrics score rows in chunks)."""
    per_token = F.cross_entropy(_upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=-100, reduction="none")
    return per_token.view(targets.shape).sum(-1), (targets != -100).sum(-1).to(per_token.dtype)


def token_kl_rows(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: KL(p_pre ‖ p_post) summed over the masked positions, and their number (so that
    Σ sums / Σ counts over chunks of rows is `token_kl` of all rows)."""
    pre = F.log_softmax(_upcast(pre_logits), dim=-1)
    post = F.log_softmax(_upcast(post_logits), dim=-1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum(-1), m.sum(-1)
