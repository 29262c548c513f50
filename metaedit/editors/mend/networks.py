"""MEND's gradient-transform networks (Mitchell et al. 2022, §3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = {"gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


class RunningNorm(nn.Module):
    """Per-feature running mean/std (saved as buffers); `GradientTransform` updates it in training mode
    only and normalises with `stacked_moments`."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        # Chan et al.'s parallel Welford merge of the batch statistics into the running ones.
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count.copy_(n)


def stacked_moments(norms: list[RunningNorm], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[L, dim] means and stds of L running norms in a handful of vectorised ops (no host sync);
    (0, 1) for a norm that has seen fewer than two rows."""
    count = torch.stack([n.count for n in norms]).unsqueeze(-1)
    mean = torch.stack([n.mean for n in norms])
    std = (torch.stack([n.m2 for n in norms]) / (count - 1).clamp_min(1)).sqrt().clamp_min(norms[0].eps)
    ready = count >= 2
    return torch.where(ready, mean, 0.0).to(dtype), torch.where(ready, std, 1.0).to(dtype)


class GradientTransform(nn.Module):
    """g: [norm(u); norm(δ)] -> (ũ, δ̃), shared by every layer of one (d_in, d_out) shape.

    Two residual blocks h <- h + act(s_ℓ ⊙ (U V h + b) + o_ℓ) with low rank r; U starts at zero and
    the FiLM scale/shift (s_ℓ, o_ℓ) at 1/0, so g starts as the identity and MEND's first edits are
    plain (normalised) fine-tuning steps. act must have act(0) = 0 and act'(0) ≠ 0: with ReLU
    (ReLU'(0) = 0) the zero-initialised blocks get exactly zero gradient and never train.

    transform_delta=False keeps δ̃ the normalised δ: the blocks still read both halves but only ũ is
    learned, so the update's direction in the layer's output space is the gradient's own, on kinds of
    facts training never showed as well as on those it did.
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int = 2, act: str = "gelu",
                 transform_delta: bool = True) -> None:
        super().__init__()
        self.d_in, self.d_out, self.transform_delta = d_in, d_out, transform_delta
        self.act = ACTIVATIONS[act]
        dim = d_in + d_out
        r = min(rank, dim)  # a rank above the width adds parameters but no expressiveness
        self.norms = nn.ModuleList(RunningNorm(dim) for _ in range(n_layers))
        self.down = nn.ParameterList(nn.Parameter(torch.randn(r, dim) / dim**0.5) for _ in range(n_blocks))
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(dim, r)) for _ in range(n_blocks))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(n_blocks))
        self.scale = nn.Parameter(torch.ones(n_layers, n_blocks, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, n_blocks, dim))

    def forward(self, u: Tensor, delta: Tensor, layers: list[int]) -> tuple[Tensor, Tensor]:
        """u: [L, n, d_in], delta: [L, n, d_out] for the L inner layers `layers` (indices into this
        network's per-layer statistics and scale/shift), all with the same n rows. Running them as one
        stack costs one kernel per operation instead of L: most of a small model's edit time is
        per-operation overhead, not arithmetic."""
        h = torch.cat([u, delta], dim=-1)
        norms = [self.norms[layer] for layer in layers]
        if self.training:
            for j, norm in enumerate(norms):
                norm.update(h[j])
        mean, std = stacked_moments(norms, h.dtype)
        h = (h - mean.unsqueeze(1)) / std.unsqueeze(1)
        delta_n = h[..., self.d_in :]
        idx = torch.tensor(layers, device=h.device)
        for k in range(len(self.up)):
            pre = (h @ self.down[k].T) @ self.up[k].T + self.bias[k]
            h = h + self.act(self.scale[idx, k].unsqueeze(1) * pre + self.shift[idx, k].unsqueeze(1))
        return h[..., : self.d_in], h[..., self.d_in :] if self.transform_delta else delta_n
