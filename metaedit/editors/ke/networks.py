"""KnowledgeEditor's networks (De Cao et al. 2021, §3): the condition encoder and the per-matrix
hyper-network that turns a fine-tuning gradient into an update."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class ConditionEncoder(nn.Module):
    """Text "{old answer} >> {new target} || {input}" -> condition vector c.

    Embeddings are a trainable copy of the base model's input embeddings (so the editor reads the
    text in the base's own token space), followed by a bidirectional LSTM, mean pooling over the real
    tokens and a tanh feed-forward layer.
    """

    def __init__(self, embeddings: Tensor, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().clone().float(), freeze=False)
        self.lstm = nn.LSTM(self.embed.embedding_dim, hidden, batch_first=True, bidirectional=True)
        self.ff = nn.Linear(2 * hidden, cond_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(-1).clamp_min(1)
        # Packing: with right padding the backward direction would otherwise read the pads first.
        packed = pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])
        m = mask[:, : out.shape[1]].unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / lengths.unsqueeze(-1).to(out.dtype)
        return torch.tanh(self.ff(pooled))


class MatrixConditioner(nn.Module):
    """c -> (α_r ∈ R^m, α_c ∈ R^n, β_r ∈ R^m, β_c ∈ R^n, η) for one m×n matrix, and the update
    ΔW = σ(η)·(a ⊙ ∇W + b) with a = softmax(α_r)·α_cᵀ, b = softmax(β_r)·β_cᵀ (both rank 1).

    Parameterisation (same function class as the paper): the MLP emits α_c / (m·init_lr).
    softmax(α_r) sums to 1 over m rows, so α_c itself must be of order m·step; emitting it in those
    units keeps the MLP's outputs O(1), where Adam's step sizes make sense. b is not rescaled: it is
    an offset in weight units, applied whatever the gradient, and a scaled b let one training run
    learn a near-constant offset ten times larger than the weights (tiny-gpt2, loc_retain 0.86).
    Initialisation: the α_c output's bias is −2, so σ(η)·a ≈ −init_lr everywhere and b ≈ 0: the
    untrained editor makes a plain descent step of size init_lr (as MEND starts from the identity),
    and the sign stays learnable.
    """

    def __init__(self, cond_dim: int, hidden: int, d_out: int, d_in: int, init_lr: float) -> None:
        super().__init__()
        self.m, self.n = d_out, d_in
        self.scale = d_out * init_lr
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * (d_out + d_in) + 1))
        out = self.net[2]
        with torch.no_grad():
            out.weight.mul_(1e-1)  # conditions start close (one plain step) but not identical
            out.bias.zero_()
            out.bias[d_out : d_out + d_in] = -2.0  # σ(0)·(1/m)·(−2·m·init_lr) = −init_lr

    def forward(self, c: Tensor, grads: Tensor) -> Tensor:
        """c: [n_edits, cond_dim]; grads: [n_edits, m, n] per-edit ∇W -> ΔW [m, n] (summed over edits)."""
        a_r, a_c, b_r, b_c, eta = self.net(c).split([self.m, self.n, self.m, self.n, 1], dim=-1)
        a = a_r.softmax(-1).unsqueeze(-1) * (self.scale * a_c).unsqueeze(-2)
        b = b_r.softmax(-1).unsqueeze(-1) * b_c.unsqueeze(-2)
        return (torch.sigmoid(eta).unsqueeze(-1) * (a * grads + b)).sum(0)
