"""Key whitening for editors whose update is built from MLP keys (MEND's pseudo-keys, ENN's and KE's
edit-loss gradients): the update's key side is applied along A k with A = (C + ρ·mean(diag C)·I)⁻¹,
C = E[k kᵀ] the second moment of the layer's keys over a generic corpus (metaedit.locate.stats),
as ROME's and MEMIT's updates are. Another prompt's key k' then sees kᵀA k': small for the
directions every text uses, which are what a neighbour's key shares with the edit's (same template,
same kind of subject), so the update moves such neighbours less.

The update's effect on the edit itself is kept: a row u becomes A u · (uᵀu)/(uᵀA u), and a
gradient G = Σ δ uᵀ becomes G A · ⟨G, G⟩/⟨G, G A⟩, so a step −η G_w lowers the edit loss, to first
order, exactly as much as the plain step −η G (⟨G, G_w⟩ = ⟨G, G⟩). Editors keep their step sizes'
meaning, and a whitened editor starts meta-training where the plain one does.

MALMEN uses the same statistics the other way round: C (regularised, scaled to mean diagonal 1) as
the penalty of its least-squares solve (`covariances`; its key_covariance option).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaedit.locate.arch import layout_of, n_layers
from metaedit.locate.solve import regularised
from metaedit.locate.stats import StatsSpec, second_moments
from metaedit.models.inner_params import InnerParam
from metaedit.types import MetaEditError

if TYPE_CHECKING:
    from metaedit.editors.base import Editor


class KeyWhitening:
    """A per inner parameter, made on first use and kept in memory (never saved: it is derived from
    the base model and the cached statistics). `rho` None turns whitening off (everything passes
    through). Every inner parameter must be an MLP output projection, whose input is the key C
    describes; that is checked at construction, so a wrong layer fails before training starts."""

    def __init__(self, method: str, model: Any, inner_params: Sequence[InnerParam], rho: float | None,
                 stats: StatsSpec | dict[str, Any] | None, option: str = "key_whitening") -> None:
        # `option`: the editor's name for ρ, which error messages quote (MALMEN's is key_covariance).
        if rho is not None and not rho > 0:
            raise MetaEditError(f"{method} {option} must be > 0 or null, got {rho}")
        self.method, self.model, self.rho, self.option = method, model, None if rho is None else float(rho), option
        self.stats = StatsSpec.coerce(stats)
        self._moments: list[Tensor] | None = None  # C + ρ·mean(diag C)·I, float64, the model's device
        self._inverses: list[Tensor] | None = None  # their inverses A
        self._cast: dict[tuple[str, torch.dtype, torch.device], list[Tensor]] = {}
        self.layers = self._key_layers(inner_params) if self.rho is not None else []

    @property
    def enabled(self) -> bool:
        return self.rho is not None

    def _key_layers(self, inner_params: Sequence[InnerParam]) -> list[int]:
        """The block index of each inner parameter, which must be a block's MLP output projection."""
        lay = layout_of(self.model)
        by_name = {f"{lay.blocks}.{ell}.{lay.out_proj}": ell for ell in range(n_layers(self.model))}
        missing = [p.module_name for p in inner_params if p.module_name not in by_name]
        if missing:
            raise MetaEditError(f"{self.method} {self.option} needs every inner parameter to be an MLP output "
                                f"projection ({lay.blocks}.N.{lay.out_proj}); not one: {missing}")
        return [by_name[p.module_name] for p in inner_params]

    def _regularised(self, editor: Editor) -> list[Tensor]:
        """C + ρ·mean(diag C)·I per inner parameter, float64 on the model's device. The statistics
        sample text from the base model through the editor's tokenizer (computed once per base
        model, then cached under the editor's cache_root)."""
        if self._moments is None:
            if editor.formatter is None:
                raise MetaEditError(f"{self.method} {self.option} needs the tokenizer (the key statistics sample "
                                    "text from the base model); load the editor with one")
            assert self.rho is not None
            moments = second_moments(self.model, editor.formatter.tokenizer, sorted(set(self.layers)), self.stats,
                                     editor.cache_root)
            by_layer = {ell: regularised(c, self.rho) for ell, c in moments.items()}
            self._moments = [by_layer[ell] for ell in self.layers]
        return self._moments

    def _inverse(self, editor: Editor) -> list[Tensor]:
        """A per inner parameter, float64 on the model's device (layers sharing a block share one)."""
        if self._inverses is None:
            moments = self._regularised(editor)
            inverse = {id(c): torch.linalg.inv(c) for c in moments}
            self._inverses = [inverse[id(c)] for c in moments]
        return self._inverses

    def covariances(self, editor: Editor, like: Tensor) -> list[Tensor]:
        """(C + ρ·mean(diag C)·I)/((1 + ρ)·mean(diag C)) per inner parameter in `like`'s dtype and
        device: the regularised key second moment scaled to mean diagonal 1, so that it can stand
        where an identity stood (same trace) without changing the meaning of a weight on it."""
        key = ("covariance", like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = [(c / torch.diagonal(c).mean()).to(like.device, like.dtype)
                               for c in self._regularised(editor)]
        return self._cast[key]

    def matrices(self, editor: Editor, like: Tensor) -> list[Tensor]:
        """A per inner parameter in `like`'s dtype and device (converted once per dtype: float32, or
        float64 in exact checks)."""
        key = ("inverse", like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = [a.to(like.device, like.dtype) for a in self._inverse(editor)]
        return self._cast[key]

    def prepare(self, editor: Editor, inverse: bool = True) -> None:
        """Compute (or load) the statistics now, when ρ is set: an editor's `prepare`, so that the
        first edit's time is not the statistics' (and, with `inverse`, not the inversion's)."""
        if self.enabled:
            self._inverse(editor) if inverse else self._regularised(editor)

    def rows(self, editor: Editor, i: int, u: Tensor) -> Tensor:
        """u_w = A u · (uᵀu)/(uᵀA u) for the rows u [..., d_in] of inner parameter i; zero rows stay zero."""
        if not self.enabled:
            return u
        with torch.autocast(u.device.type, enabled=False):
            u = _at_least_float32(u)
            w = u @ self.matrices(editor, u)[i]  # A is symmetric
            return w * _projection_kept(u, w, dims=(-1,))

    def gradient(self, editor: Editor, i: int, g: Tensor, preserved: Tensor | None = None) -> Tensor:
        """G_w = G A · ⟨G, G⟩/⟨G, G A⟩ for gradients g [..., d_out, d_in] of inner parameter i (one scale
        per matrix). `preserved` (U [d_in, m], the preserved keys K_Pᵀ scaled by √μ;
        metaedit/editors/preserve.py) puts them into A: A_P = (C_ρ + U Uᵀ)⁻¹, so the step moves
        those keys' outputs little and spends its effect on the directions that separate the edit's
        key from theirs. By Woodbury, G A_P = G A − (G A U)(I + Uᵀ A U)⁻¹ (A U)ᵀ: an m × m solve
        per step instead of a d_in × d_in inverse."""
        if not self.enabled:
            return g
        with torch.autocast(g.device.type, enabled=False):
            g = _at_least_float32(g)
            a = self.matrices(editor, g)[i]
            w = g @ a
            if preserved is not None and preserved.shape[-1] > 0:
                u = preserved.to(a.dtype)
                au = a @ u
                inner = torch.eye(u.shape[-1], dtype=a.dtype, device=a.device) + u.T @ au
                w = w - (w @ u) @ torch.linalg.solve(inner, au.T)
            return w * _projection_kept(g, w, dims=(-2, -1))


def _at_least_float32(x: Tensor) -> Tensor:
    """x in float32 (float64 stays): A = (C + ρI)⁻¹ has entries of both signs that cancel in x A, so
    rounded to bf16 (as under bf16 autocast, or for a bf16 x) the product loses the small directions
    whitening is for. `rows` and `gradient` return float32; their callers cast to the weights' dtype."""
    return x if x.dtype == torch.float64 else x.float()


def _projection_kept(x: Tensor, w: Tensor, dims: tuple[int, ...]) -> Tensor:
    """⟨x, x⟩/⟨x, w⟩ over `dims`, so that ⟨x, w · scale⟩ = ⟨x, x⟩. ⟨x, xA⟩ > 0 for x ≠ 0 (A is
    positive definite), so the clamp only keeps an all-zero x at zero."""
    num = (x * x).sum(dims, keepdim=True)
    return num / (x * w).sum(dims, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
