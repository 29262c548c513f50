"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the keys of
preserved knowledge, with the keys of earlier edits kept across a sequence."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from safetensors import safe_open
from torch import Tensor
from transformers import PreTrainedModel

from metaedit.data.readers import training_records
from metaedit.data.records import digest
from metaedit.editors.locate_then_edit import LocateEditor
from metaedit.functional import EditedModel
from metaedit.locate.solve import alphaedit_delta, null_space_projector
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam
from metaedit.progress import Progress
from metaedit.types import EditRequest, LMBatch, MetaEditError
from metaedit.utils import file_lock, save_tensors

log = logging.getLogger(__name__)


class AlphaEditEditor(LocateEditor):
    """Per layer: ΔW = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + αI)⁻¹, residuals spread as in MEMIT.

    P projects onto the eigenvectors of C = E[k kᵀ] with eigenvalue < `null_space_threshold`
    (absolute, as in the paper: 2e-2 for Llama-3-8B), so W K₀ is unchanged for every key in
    the preserved subspace. `l2` is α.

    Sequence state: inside `editing_from` (every step of `edit_sequential`) each edit adds its keys'
    K₁K₁ᵀ to K_p K_pᵀ per layer, so later edits of the sequence leave earlier ones alone.
    `reset_sequence()` (called by `edit_sequential` first) forgets them. Edits made outside
    `editing_from` (single / batch evaluation) use only C and do not accumulate anything.

    Preserved facts (`preserve_facts`, off by default; beyond the paper): the keys of the *training*
    facts of a built dataset directory (train.json only: its val/test stay held out), read as an
    edit's keys are, join K_p K_pᵀ with weight `preserve_weight` in every solve — single, batch and
    sequence — as if they were earlier edits. The projection P keeps only the directions that dominate
    C; the keys that distinguish one subject from a similar one (two provinces of one country) are
    rare in any corpus, so they fall in P's "null" space and an edit of one subject reaches the
    other. Keys of known facts of that kind penalise exactly those directions.
    """

    method = "alphaedit"
    hparams_from_model = {**LocateEditor.hparams_from_model, "layers": "locate.memit_layers"}
    default_n_layers = 5

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam],
                 layers: Sequence[int] | None = None, null_space_threshold: float = 2e-2, l2: float = 10.0,
                 clamp_norm_factor: float = 0.75, preserve_facts: str | None = None, preserve_weight: float = 1.0,
                 preserve_limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, inner_params, layers=layers, clamp_norm_factor=clamp_norm_factor, **kwargs)
        if null_space_threshold <= 0 or l2 <= 0:
            raise MetaEditError(f"alphaedit: need null_space_threshold > 0 and l2 > 0, got {null_space_threshold}, {l2}")
        if preserve_weight <= 0 or (preserve_limit is not None and preserve_limit < 1):
            raise MetaEditError(f"alphaedit: need preserve_weight > 0 and preserve_limit >= 1 or null, "
                                f"got {preserve_weight}, {preserve_limit}")
        self.null_space_threshold, self.l2 = null_space_threshold, l2
        self.preserve_facts = None if preserve_facts is None else str(preserve_facts)
        self.preserve_weight, self.preserve_limit = preserve_weight, preserve_limit
        self._projectors: dict[int, Tensor] = {}
        self._facts_grams: dict[int, Tensor] | None = None
        self._facts_seconds: float | None = None
        self.preserved: dict[int, Tensor] = {}  # layer -> Σ K_p K_pᵀ of this sequence's earlier edits

    def hparams(self) -> dict[str, Any]:
        return {**self._common_hparams(), "null_space_threshold": self.null_space_threshold, "l2": self.l2,
                "preserve_facts": self.preserve_facts, "preserve_weight": self.preserve_weight,
                "preserve_limit": self.preserve_limit}

    def prepare(self) -> None:
        super().prepare()
        if self.preserve_facts is not None:
            self.facts_gram(self.layers[0])

    def one_off_costs(self) -> dict[str, float]:
        costs = super().one_off_costs()
        if self._facts_seconds is not None:
            costs["preserve_facts_min"] = round(self._facts_seconds / 60, 2)
        return costs

    def facts_gram(self, layer: int) -> Tensor | None:
        """preserve_weight · Σ k kᵀ over the preserved facts' keys at `layer` (None without
        `preserve_facts`), read once per editor on the unedited model."""
        if self.preserve_facts is None:
            return None
        if self._facts_grams is None:
            self._facts_grams, self._facts_seconds = self._read_facts_grams()
        return self._facts_grams[layer]

    def _read_facts_grams(self, chunk: int = 64) -> tuple[dict[int, Tensor], float | None]:
        """Σ k kᵀ per layer (times preserve_weight) of the preserved facts' keys, and the seconds the
        read took when it was made; the unweighted sums are cached on disk per base, edited modules,
        key settings and facts (the read is minutes), with those seconds in the file's metadata so
        that a run reusing the cache reports what the sums cost, like the key statistics do."""
        records = training_records(self.preserve_facts or "")
        requests = [EditRequest(r["prompt"], r["target_true"], r["subject"])
                    for r in records if r.get("subject") and r.get("target_true")]
        if self.preserve_limit is not None:
            requests = requests[: self.preserve_limit]
        if not requests:
            raise MetaEditError(f"alphaedit: {self.preserve_facts}/train.json has no record with a subject and a "
                                f"true object to preserve")
        scope = {"format": 1, "fingerprint": fingerprint(self.model), "contexts": self.contexts(),
                 "modules": [self.param_of(layer).name for layer in self.layers], "fact_token": self.fact_token,
                 "prompt_key": self.prompt_key, "subject_fallback": self.subject_fallback,
                 "dtype": str(next(self.model.parameters()).dtype), "facts": digest([asdict(q) for q in requests])}
        path = self.cache_root / "preserve" / f"{digest(scope)}.safetensors"
        # Under a lock: two editors started together on the same facts (two bench rows) read them once.
        with file_lock(path.with_suffix(".lock")):
            if path.is_file():
                log.info("alphaedit: preserved facts' keys from %s", path)
                with safe_open(str(path), framework="pt") as f:  # one open: the sums and their recorded cost
                    cached = {layer: self.preserve_weight * f.get_tensor(str(layer)).to(self.device)
                              for layer in self.layers}
                    seconds = (f.metadata() or {}).get("seconds")  # absent in caches of before it was recorded
                return cached, float(seconds) if seconds is not None else None
            t0 = time.perf_counter()
            grams: dict[int, Tensor] = {}
            progress = Progress(len(requests), unit="fact", noun="preserved facts' keys read")
            for start in range(0, len(requests), chunk):
                keys, _ = self.read(requests[start: start + chunk], {}, key_layers=self.layers)
                for layer, k in keys.items():
                    g = k.double() @ k.double().T
                    grams[layer] = grams[layer] + g if layer in grams else g
                done = min(start + chunk, len(requests))
                if progress.due(done):
                    log.info("alphaedit: %s", progress.line(done))
            path.parent.mkdir(parents=True, exist_ok=True)
            seconds = time.perf_counter() - t0
            save_tensors({str(layer): g.cpu().contiguous() for layer, g in grams.items()}, path,  # whole or none
                         metadata={"scope": json.dumps(scope, default=str), "seconds": repr(seconds)})
        return {layer: self.preserve_weight * g for layer, g in grams.items()}, seconds

    def projector(self, layer: int) -> Tensor:
        if layer not in self._projectors:
            self._projectors[layer] = null_space_projector(self.moments(layer), self.null_space_threshold)
        return self._projectors[layer]

    def layer_delta(self, layer: int, keys: Tensor, residual: Tensor, w: Tensor) -> Tensor:
        kp = self.preserved.get(layer) if self._in_sequence else None
        facts = self.facts_gram(layer)
        if facts is not None:
            kp = facts if kp is None else kp + facts
        return alphaedit_delta(residual, keys, self.projector(layer), kp, self.l2)

    def reset_sequence(self) -> None:
        self.preserved = {}
        # A sequence (resumed ones too) swaps its running edit into the model from here on: the
        # preserved facts' keys must be read before that, on the unedited model.
        if self.preserve_facts is not None:
            self.facts_gram(self.layers[0])

    def sequence_state(self) -> dict[str, Tensor]:
        return {f"preserved.{layer}": gram for layer, gram in self.preserved.items()}

    def load_sequence_state(self, state: Mapping[str, Tensor]) -> None:
        layers = {}
        for name, gram in state.items():
            kind, _, layer = name.partition(".")
            if kind != "preserved" or not layer.isdigit() or int(layer) not in self.layers:
                raise MetaEditError(f"alphaedit: a saved sequence holds {name!r}; this editor keeps "
                                    f"preserved.<layer> for layers {list(self.layers)}")
            layers[int(layer)] = gram.double()
        self.preserved = layers

    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        if not requests:
            raise MetaEditError("alphaedit: no edit requests")
        params, keys = self.spread_edits(requests)
        if self._in_sequence:
            for layer, k in keys.items():
                gram = (k @ k.T).double()
                self.preserved[layer] = self.preserved[layer] + gram if layer in self.preserved else gram
        return EditedModel(self.model, params)
