"""Closed-form weight updates of ROME, MEMIT and AlphaEdit, all in [d_out, d_in] orientation
(y = W k). Solves run in float64: C's small eigenvalues are exactly the directions that matter."""

from __future__ import annotations

import torch
from torch import Tensor


def regularised(c: Tensor, ridge: float) -> Tensor:
    """C + ridge·mean(diag C)·I: a C estimated from finitely many tokens is singular along key
    directions the corpus never used; the ridge (relative to C's scale) keeps C⁻¹ finite there."""
    c = c.to(torch.float64)
    if ridge <= 0:
        return c
    scale = torch.diagonal(c).mean().clamp_min(torch.finfo(torch.float64).tiny)
    return c + ridge * scale * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def rome_delta(w: Tensor, k: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """ΔW = (v − W k)(C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)  (ROME, Meng et al. 2022, eq. 2).

    The rank-one update that makes W' k = v exactly while changing W k' least for keys k' drawn
    from C: any key with k'ᵀC⁻¹k = 0 keeps its value. Shapes: w [d_out, d_in], k [d_in], v [d_out],
    c [d_in, d_in] (already regularised if wanted).

    Several keys of one fact (k [d_in, m], v [d_out, m]): the same constrained least squares,
    ΔW = (V − W K)(Kᵀ C⁻¹ K)⁻¹ (C⁻¹K)ᵀ — the smallest change in the C⁻¹ norm with W' K = V exactly
    (rank m; m = 1 is the formula above).
    """
    if k.dim() == 1:
        return rome_delta(w, k[:, None], v[:, None], c)
    w64, k64, v64 = w.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    u = torch.linalg.solve(c.to(torch.float64), k64)  # C⁻¹K [d_in, m]
    # pinv: two keys that (nearly) coincide ask for the same change once, not for a singular solve.
    return (v64 - w64 @ k64) @ torch.linalg.pinv(k64.T @ u, hermitian=True) @ u.T


def memit_delta(r: Tensor, k: Tensor, c: Tensor, lam: float) -> Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹  (MEMIT, Meng et al. 2023, eq. 14), the least-squares update that
    adds R to the outputs of the new keys K while keeping λC-weighted old associations.

    r [d_out, n] (residuals), k [d_in, n] (new keys), c [d_in, d_in] = E[k kᵀ].
    """
    k64 = k.to(torch.float64)
    a = lam * c.to(torch.float64) + k64 @ k64.T  # symmetric, so Δᵀ = A⁻¹ K Rᵀ
    return torch.linalg.solve(a, k64 @ r.to(torch.float64).T).T


def null_space_projector(c: Tensor, threshold: float) -> Tensor:
    """P = U₀U₀ᵀ over the eigenvectors of C with eigenvalue < `threshold` (AlphaEdit, Fang et al.
    2025): the key directions that preserved knowledge (the corpus behind C) does not use, so an
    update ΔW = X P never changes W K₀ for preserved keys K₀ (P K₀ ≈ 0)."""
    evals, evecs = torch.linalg.eigh(c.to(torch.float64))
    u0 = evecs[:, evals < threshold]
    return u0 @ u0.T


def alphaedit_delta(r: Tensor, k: Tensor, p: Tensor, kp_kpT: Tensor | None, l2: float) -> Tensor:
    """ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + αI)⁻¹  (AlphaEdit, eq. 11), computed through its
    transpose X = ΔWᵀ = (P(K_p K_pᵀ + K₁ K₁ᵀ) + αI)⁻¹ P K₁ Rᵀ (P and the Gram matrices are symmetric).

    X = P(K₁Rᵀ − (K_pK_pᵀ + K₁K₁ᵀ)X)/α lies in P's range, so ΔW K₀ = Xᵀ K₀ = 0 whenever P K₀ = 0:
    preserved keys keep their values exactly. `kp_kpT` sums K_p K_pᵀ of earlier edits in a sequence.
    """
    k64, p64 = k.to(torch.float64), p.to(torch.float64)
    gram = k64 @ k64.T
    if kp_kpT is not None:
        gram = gram + kp_kpT.to(torch.float64)
    eye = torch.eye(p64.shape[0], dtype=torch.float64, device=p64.device)
    x = torch.linalg.solve(p64 @ gram + l2 * eye, p64 @ k64 @ r.to(torch.float64).T)
    return x.T
