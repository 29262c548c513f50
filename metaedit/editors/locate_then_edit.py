"""What ROME, MEMIT and AlphaEdit share: the edited layers, the key statistics C, the contexts keys
are averaged over, k* and the optimised target value, and MEMIT's spreading of residuals over
consecutive layers (used by MEMIT and AlphaEdit, which differ only in the per-layer solve).

None of them is trained (`trainable()` is False): the saved "checkpoint" is the hyper-parameters.
The edited matrices are the MLP output projections of `layers` (metaedit/locate/arch.py), not the
model config's `inner_params`. Default layers and `fact_token` come from the model config's `locate`
section (see `hparams_from_model`), else layers from the depth (about a third of the way in).

`fact_token` is the token whose MLP key is edited: "subject_last" (ROME/MEMIT on pretrained LMs,
where causal traces put recall at the subject's last token) or "last" (the prompt's last token: the
tiny synthetic-world models move the subject to the last token in block 0 and recall there, as their
causal trace shows). `prompt_key` adds, per request, the key read in the bare prompt (no context) as a second column
written with the same value shift: on a model without a BOS token a subject that opens the prompt is
another token than after any context, so the context average alone misses the prompt itself.

A request without a subject falls back to the last prompt token
(`subject_fallback: last_token`, KL term skipped) or is refused (`subject_fallback: error`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedModel

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.locate import arch
from metaedit.locate.keys import Row, batch_rows, group_mean, read_at, request_rows, sample_contexts
from metaedit.locate.stats import StatsSpec, recorded_costs, second_moments
from metaedit.locate.value_cache import ValueCache
from metaedit.locate.values import DeltaSettings, optimise_delta
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam
from metaedit.precision import uses_bf16
from metaedit.progress import Progress
from metaedit.types import EditRequest, LMBatch, MetaEditError

log = logging.getLogger(__name__)
KL_TEMPLATE = "{} is a"  # ROME's essence prompt: the subject's other properties should survive the edit


def default_layers(model: PreTrainedModel, n: int) -> list[int]:
    """`n` consecutive layers ending about a third of the way in (where causal traces of GPT-style
    models put factual recall); used only when neither the method nor the model config names any."""
    last = (arch.n_layers(model) - 1) // 3
    return list(range(max(0, last - n + 1), last + 1))


class LocateEditor(Editor):
    """Base of the locate-then-edit editors (not registered itself)."""

    # hparam -> dotted key of the model config it defaults to (filled by build_editor when unset).
    hparams_from_model: ClassVar[dict[str, str]] = {"fact_token": "locate.fact_token",
                                                     "n_contexts": "locate.n_contexts",
                                                     "prompt_key": "locate.prompt_key"}
    default_n_layers: ClassVar[int] = 1
    report_from: ClassVar[int] = 50  # edits in one batch from which its phases log progress lines

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        layers: Sequence[int] | None = None,
        v_steps: int = 20,
        v_lr: float = 0.5,
        kl_factor: float = 0.0625,
        v_weight_decay: float = 0.05,
        clamp_norm_factor: float = 1.0,
        v_precision: str = "auto",
        n_contexts: int | None = 10,
        context_tokens: int = 10,
        seed: int = 0,
        c_ridge: float = 1e-4,
        subject_fallback: str = "last_token",
        fact_token: str | None = "subject_last",
        stats: StatsSpec | dict[str, Any] | None = None,
        prompt_key: bool | None = False,
    ) -> None:
        # None (a method config deferring to a model config that has no value): the defaults.
        n_contexts = 10 if n_contexts is None else n_contexts
        fact_token = fact_token or "subject_last"
        resolved = arch.check_layers(model, list(layers) if layers is not None else default_layers(model, self.default_n_layers))
        # The edited matrices follow from `layers`; the generic inner-param default does not apply.
        super().__init__(model, arch.out_proj_params(model, resolved))
        if fact_token not in ("subject_last", "last"):
            raise MetaEditError(f"fact_token must be 'subject_last' or 'last', got {fact_token!r}")
        if subject_fallback not in ("last_token", "error"):
            raise MetaEditError(f"subject_fallback must be 'last_token' or 'error', got {subject_fallback!r}")
        if v_precision not in ("auto", "fp32", "bf16"):
            raise MetaEditError(f"v_precision must be 'auto', 'fp32' or 'bf16', got {v_precision!r}")
        if v_steps < 0 or v_lr <= 0 or n_contexts < 0 or context_tokens < 1 or c_ridge < 0:
            raise MetaEditError(f"{self.method}: need v_steps >= 0, v_lr > 0, n_contexts >= 0, context_tokens >= 1, "
                                f"c_ridge >= 0")
        self.layers = resolved
        self.delta_settings = DeltaSettings(steps=v_steps, lr=v_lr, kl_factor=kl_factor, weight_decay=v_weight_decay,
                                            clamp_norm_factor=clamp_norm_factor, precision=v_precision)
        self.n_contexts, self.context_tokens, self.seed = n_contexts, context_tokens, seed
        self.c_ridge, self.subject_fallback, self.fact_token = c_ridge, subject_fallback, fact_token
        self.prompt_key = bool(prompt_key)
        self.stats = StatsSpec.coerce(stats)
        self._contexts: list[str] | None = None
        self._moments: dict[int, Tensor] = {}

    def _common_hparams(self) -> dict[str, Any]:
        s = self.delta_settings
        return {"layers": list(self.layers), "v_steps": s.steps, "v_lr": s.lr, "kl_factor": s.kl_factor,
                "v_weight_decay": s.weight_decay, "clamp_norm_factor": s.clamp_norm_factor, "v_precision": s.precision,
                "n_contexts": self.n_contexts, "context_tokens": self.context_tokens, "seed": self.seed,
                "c_ridge": self.c_ridge, "subject_fallback": self.subject_fallback,
                "fact_token": self.fact_token, "prompt_key": self.prompt_key, "stats": self.stats.to_dict()}

    def hparams(self) -> dict[str, Any]:
        return self._common_hparams()

    # ---- shared pieces ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self.formatter is None:
            raise MetaEditError(f"{self.method}: this editor has no tokenizer attached; build it with a tokenizer")
        return self.formatter.tokenizer

    def contexts(self) -> list[str]:
        """"" and `n_contexts` short texts sampled once from the base model (seeded; cached)."""
        if self._contexts is None:
            self._contexts = sample_contexts(self.model, self.tokenizer, self.n_contexts, self.context_tokens, self.seed)
        return self._contexts

    def moments(self, layer: int) -> Tensor:
        """C = E[k kᵀ] of the layer's MLP keys (float32), from the statistics cache."""
        if layer not in self._moments:
            missing = [ell for ell in self.layers if ell not in self._moments]
            self._moments.update(second_moments(self.model, self.tokenizer, missing, self.stats, self.cache_root))
        return self._moments[layer]

    def prepare(self) -> None:
        """The key statistics of every edited layer (computed once, then read from the cache)."""
        for layer in self.layers:
            self.moments(layer)

    def one_off_costs(self) -> dict[str, float]:
        """The key statistics' one-off cost as recorded when they were computed: minutes of the
        pass that made them (the slowest of this editor's layers; it includes sampling the corpus when
        that pass sampled it) and the number of tokens averaged."""
        made = recorded_costs(self.model, self.layers, self.stats, self.cache_root)
        if not made:
            return {}
        return {"stats_min": round(max(m.get("seconds", 0.0) for m in made) / 60, 2),
                "stats_tokens": float(min(m.get("n_tokens", 0) for m in made))}

    def weight(self, param: InnerParam, params: dict[str, Tensor]) -> Tensor:
        """The current W [d_out, d_in] (the running edit's tensor if it has one)."""
        w = params.get(param.name)
        return arch.weight_out_in(w if w is not None else self.model.get_parameter(param.name), param)

    def rows(self, requests: Sequence[EditRequest]) -> list[Row]:
        """context × request rows, grouped by request (n_contexts + 1 per request)."""
        ctx = self.contexts()
        return [r for q in requests for r in request_rows(self.tokenizer, q, ctx, self.subject_fallback,
                                                          fact_token=self.fact_token)]

    def read(self, requests: Sequence[EditRequest], params: dict[str, Tensor], key_layers: Sequence[int] = (),
             out_layer: int | None = None) -> tuple[dict[int, Tensor], Tensor | None]:
        """Keys k [d_in, m] of `key_layers` and the residual stream h [d, m] after block `out_layer`,
        at each request's subject token, under the edit `params`: one column per request averaged
        over the contexts, then (`prompt_key`) one per request read in the bare prompt alone."""
        rows = self.rows(requests)
        batch = batch_rows(self.formatter, rows, [q.target for q in requests for _ in self.contexts()], self.device)
        inputs = {str(ell): arch.out_proj(self.model, ell) for ell in key_layers}
        outputs = {"h": arch.blocks_of(self.model)[out_layer]} if out_layer is not None else None
        deepest = max([*key_layers, *([out_layer] if out_layer is not None else [])])
        got = read_at(self.model, batch, [r.position for r in rows], params, inputs=inputs, outputs=outputs,
                      stop_after=arch.blocks_of(self.model)[deepest])

        def columns(x: Tensor) -> Tensor:
            mean = group_mean(x, len(requests))
            if not self.prompt_key or len(self.contexts()) == 1:  # no contexts: the mean is the prompt's key
                return mean
            bare = x.reshape(len(requests), -1, x.shape[-1])[:, 0].T  # context 0 is "" (the prompt alone)
            return torch.cat([mean, bare], 1)

        keys = {ell: columns(got[str(ell)]) for ell in key_layers}
        return keys, (columns(got["h"]) if out_layer is not None else None)

    def per_key(self, deltas: Tensor) -> Tensor:
        """Value shifts [d, n] (one per request) repeated for each key column `read` returns."""
        return torch.cat([deltas, deltas], 1) if self.prompt_key and len(self.contexts()) > 1 else deltas

    def delta(self, request: EditRequest, layer: int, params: dict[str, Tensor]) -> Tensor:
        """δ [d] added to the output of `layer`'s MLP at the subject token (in every context) that
        makes the model answer the request's target, with a KL term on "{subject} is a"."""
        rows = request_rows(self.tokenizer, request, self.contexts(), self.subject_fallback, fact_token=self.fact_token)
        rewrite = batch_rows(self.formatter, rows, [request.target] * len(rows), self.device)
        kl: LMBatch | None = None
        kl_pos: list[int] = []
        if request.subject is not None and self.delta_settings.kl_factor > 0:
            # Without a subject there is no essence prompt to keep: the KL term is skipped.
            kl_rows = request_rows(self.tokenizer, request, [""], self.subject_fallback,
                                   prompt=KL_TEMPLATE.format(request.subject), fact_token=self.fact_token)
            kl = batch_rows(self.formatter, kl_rows, [request.target], self.device)
            kl_pos = [r.position for r in kl_rows]
        p = arch.out_proj_params(self.model, [layer])[0]
        return optimise_delta(self.model, arch.out_proj(self.model, layer), p.name, arch.blocks_of(self.model)[layer],
                              rewrite, [r.position for r in rows], kl, kl_pos, params, self.delta_settings)

    def value_cache(self, layer: int) -> ValueCache:
        """The on-disk δ of this base, layer and value settings (metaedit/locate/value_cache.py)."""
        settings = asdict(self.delta_settings)
        # What "auto" resolved to here: bf16 steps give (slightly) different shifts than fp32 ones.
        settings["precision"] = "bf16" if uses_bf16(settings["precision"], self.device) else "fp32"
        return ValueCache(self.cache_root, {
            "fingerprint": fingerprint(self.model), "module": self.param_of(layer).name, "settings": settings,
            "contexts": self.contexts(), "fact_token": self.fact_token, "subject_fallback": self.subject_fallback,
            "kl_template": KL_TEMPLATE, "dtype": str(next(self.model.parameters()).dtype), "device": self.device.type})

    def deltas(self, requests: Sequence[EditRequest], layer: int) -> list[Tensor]:
        """`delta` of each request on the current model; a batch of more than a few logs its progress
        (each value shift is some twenty forward+backward passes: a batch of 1000 takes a while).
        Outside a sequence (the model unedited) shifts go through the value cache, which also lets
        several processes editing the same batch split the work (metaedit/locate/value_cache.py)."""
        progress = Progress(len(requests), unit="edit", noun="value shifts")

        def report(i: int) -> None:
            # (a sequence's steps of a few edits are reported by the protocol instead)
            if len(requests) >= self.report_from and progress.due(i):
                log.info("%s: %s", self.method, progress.line(i))

        if self._in_sequence:
            out = []
            for i, q in enumerate(requests, start=1):
                out.append(self.delta(q, layer, {}))
                report(i)
            return out
        return self.value_cache(layer).shared(requests, lambda q: self.delta(q, layer, {}), self.device, report)

    def param_of(self, layer: int) -> InnerParam:
        return self.inner_params[self.layers.index(layer)]

    # ---- MEMIT's multi-layer spreading (MEMIT and AlphaEdit) ----------------------------------------
    def layer_delta(self, layer: int, keys: Tensor, residual: Tensor, w: Tensor) -> Tensor:
        """ΔW [d_out, d_in] for one layer, given the new keys K [d_in, n] and the residuals R [d_out, n]
        this layer should write."""
        raise NotImplementedError

    def spread_edits(self, requests: Sequence[EditRequest]) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
        """MEMIT's algorithm: target residuals z_i = h_i + δ_i at the last edited layer L, then for each
        layer ℓ in order the residual still missing, R = (z − h(current weights)) / (layers left), is
        written by ℓ's MLP through `layer_delta`. Returns (edited tensors, keys used per layer)."""
        last = self.layers[-1]
        _, h0 = self.read(requests, {}, out_layer=last)
        assert h0 is not None
        z = h0 + self.per_key(torch.stack(self.deltas(requests, last), dim=1))
        params: dict[str, Tensor] = {}
        used: dict[int, Tensor] = {}
        # Reading the keys of a large batch takes minutes per layer (1000 edits: ~3 min here).
        progress = Progress(len(self.layers), unit="layer", noun="layers read and solved")
        for j, ell in enumerate(self.layers):
            keys, h = self.read(requests, params, key_layers=[ell], out_layer=last)
            assert h is not None
            residual = (z - h) / (len(self.layers) - j)
            p = self.param_of(ell)
            w = self.weight(p, params)
            d = self.layer_delta(ell, keys[ell], residual, w)
            params[p.name] = (arch.stored(w.to(torch.float64) + d, p)).to(w.dtype)
            used[ell] = keys[ell]
            if len(requests) >= self.report_from:
                log.info("%s: %s", self.method, progress.line(j + 1))
        return params, used

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        if not requests:
            raise MetaEditError(f"{self.method}: no edit requests")
        params, _ = self.spread_edits(requests)
        return EditedModel(self.model, params)
