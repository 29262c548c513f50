"""Preserved keys: the keys of known true facts near the edits, which an update must leave unmoved.
Used by MALMEN's solve (fitted to a zero shift), ENN's step and KE's conditioner input (both kept out
of their key direction).

MALMEN's solve fits every edit's key to its value shift and keeps the rest of the weight by a ridge
penalty (e^λ I, or the keys' second moment C with key_covariance). Neither says which *other* inputs
must not move. At the answer position the keys of "<X> is a city in the US state of" differ little
between cities, so the shift written for one city's key reaches its neighbours' (session 42: ns 0.38
against 0.75 unedited, worst on relations whose prompts share one template). Here the solve also fits
keys of true facts to a zero shift, as AlphaEdit keeps preserved knowledge and MEMIT its C, but only
the facts nearest the edits, so that the solve spends its freedom on the directions that separate an
edit's subject from its neighbours:

    min ‖K ΔWᵀ − D‖² + μ‖K_P ΔWᵀ‖² + e^λ tr(ΔW R ΔWᵀ)   →   ΔWᵀ = (KᵀK + μ K_PᵀK_P + e^λ R)⁻¹ KᵀD

ENN's gradient step has the same problem and takes the same keys through its whitening
(metaedit/editors/whitening.py): G (C + μ K_PᵀK_P)⁻¹ instead of G C⁻¹; KE's hyper-network reads
that whitened gradient.

K_P: for every edit row and inner layer, the `top_k` bank keys of that layer nearest by cosine, once
each. The bank is the answer-position keys (the rows a `rows=target` edit uses: the prompt's last
token through the answer's second-to-last) of the facts a built dataset's *training* split states
(edit prompts and rephrases with their true objects, neighbourhood prompts with their answers), read
on the base model. A fact that names an edited subject, or whose prompt is one of the batch's own
prompts, is left out: it is the fact being changed, or (in training) a prompt the outer loss scores,
which the update must not be shown — at test time the neighbours it is scored on are unseen too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from metaedit.data.readers import training_records
from metaedit.editors.rephrase import subject_template
from metaedit.functional import forward_logits
from metaedit.hooks import capture_layer_io, forward_stops_after
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam
from metaedit.progress import Progress
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError
from metaedit.utils import file_lock, save_tensors

if TYPE_CHECKING:
    from metaedit.editors.base import Editor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreserveSpec:
    """Where the preserved facts come from and how much they weigh (MALMEN's, ENN's and KE's `preserve` option).

    data: a built dataset directory; only its train.json is read.
    weight: μ, each preserved key's weight against an edit row's (both are fitted in one least squares).
    top_k: bank keys kept per edit row and layer (the nearest by cosine; the union over the batch).
    max_facts: facts read into the bank (a seeded sample when the split states more). Reading costs
        one forward per fact (~4000 facts a minute per thread on SmolLM2-135M); the bank is cached.
    swaps: subject swaps per edit (0: none; `PreservedKeys.swap_keys`): the edit's own prompt with
        another subject in it — one the training facts name in that same template — followed by the
        edit's *new* object, read at its answer-predicting positions and fitted to a zero shift with
        weight `swap_weight`. The bank holds true facts with their own objects; a neighbour also
        fails when the update teaches the new object's later tokens ("Ou" → "guiya") in the edit's
        template whatever the subject, and the swapped prompts are those keys.
    """

    data: str
    weight: float = 1.0
    top_k: int = 8
    max_facts: int | None = 4000
    seed: int = 0
    batch_size: int = 64
    swaps: int = 0
    swap_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise MetaEditError(f"preserve.weight must be > 0, got {self.weight}")
        if self.swaps < 0:
            raise MetaEditError(f"preserve.swaps must be >= 0, got {self.swaps}")
        if not self.swap_weight > 0:
            raise MetaEditError(f"preserve.swap_weight must be > 0, got {self.swap_weight}")
        if self.top_k < 1:
            raise MetaEditError(f"preserve.top_k must be >= 1, got {self.top_k}")
        if self.max_facts is not None and self.max_facts < 1:
            raise MetaEditError(f"preserve.max_facts must be >= 1 or null, got {self.max_facts}")

    @classmethod
    def coerce(cls, value: PreserveSpec | dict[str, Any] | None) -> PreserveSpec | None:
        if value is None or isinstance(value, PreserveSpec):
            return value
        try:
            return cls(**dict(value))
        except TypeError as e:
            raise MetaEditError(f"preserve: {e} (fields: data, weight, top_k, max_facts, seed, batch_size)") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str
    subject: str | None


def training_facts(data_dir: str, max_facts: int | None = None, seed: int = 0) -> list[Fact]:
    """The true facts a built dataset's training split states, deduplicated by prompt, in a seeded order."""
    facts: dict[str, Fact] = {}
    for r in training_records(data_dir):
        if r.get("target_true"):
            for p in (r["prompt"], *r.get("rephrases", [])):
                facts.setdefault(p, Fact(p, r["target_true"], r.get("subject") or None))
        for x in r.get("locality", []):
            if x.get("answer"):
                facts.setdefault(x["prompt"], Fact(x["prompt"], x["answer"], None))
    out = sorted(facts.values(), key=lambda f: f.prompt)
    random.Random(seed).shuffle(out)
    if not out:
        raise MetaEditError(f"preserve.data {data_dir}: its training split states no fact with a true answer")
    return out[:max_facts] if max_facts is not None else out


class PreservedKeys:
    """The bank (read on first use, then kept in memory and cached on disk under the editor's
    cache_root: it is derived from the base model and the data, never saved with the editor) and the
    selection of preserved keys for a batch of edits."""

    def __init__(self, model: Any, inner_params: Sequence[InnerParam], spec: PreserveSpec | dict[str, Any] | None) -> None:
        self.model, self.inner_params = model, list(inner_params)
        self.spec = PreserveSpec.coerce(spec)
        self.facts: list[Fact] = []
        self._keys: list[Tensor] | None = None  # per inner layer: [bank rows, d_in] float32
        self._norms: list[Tensor] | None = None  # their norms [bank rows] (cosine retrieval)
        self._fact_of_row: Tensor | None = None  # [bank rows] index into self.facts
        # The prompts the outer loss scores in the current training step (never preserved: they
        # stand for unseen neighbours); set by `scoring`.
        self._avoid: list[str] = []
        self._templates: dict[tuple[str, str], list[str]] = {}  # swaps: (before, after) -> subjects

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    def prepare(self, editor: Editor) -> None:
        """Read the bank: from the cache when this model, data and spec made one, else one forward per
        fact (stopped after the deepest inner layer), then cached under the editor's cache_root."""
        if self.spec is None or self._keys is not None:
            return
        if editor.formatter is None:
            raise MetaEditError("preserve needs the tokenizer (the bank reads fact prompts); load the editor with one")
        self.facts = training_facts(self.spec.data, self.spec.max_facts, self.spec.seed)
        names = [p.module_name for p in self.inner_params]
        digest = hashlib.sha256(json.dumps({
            "facts": [(f.prompt, f.answer) for f in self.facts], "modules": names,
            "model": fingerprint(self.model)}).encode()).hexdigest()[:16]
        path = editor.cache_root / "preserve" / f"bank.{digest}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_suffix(".lock")):
            cached = self._load(path, len(names))
            if cached is not None:
                keys, owners = cached
                log.info("preserve bank: %d keys of %d training facts from %s", owners.numel(), len(self.facts), path)
            else:
                keys, owners = self._read(editor)
                save_tensors({**{f"keys.{i}": k.contiguous() for i, k in enumerate(keys)}, "owner": owners}, path)
        self._keys = [k.to(editor.device) for k in keys]
        self._norms = [k.norm(dim=-1).clamp_min(1e-12) for k in self._keys]
        self._fact_of_row = owners.to(editor.device)

    def _load(self, path: Path, n_layers: int) -> tuple[list[Tensor], Tensor] | None:
        """A cached bank, or None when there is none or it cannot be read (then it is read again)."""
        if not path.is_file():
            return None
        try:
            saved = load_file(str(path))
            keys, owners = [saved[f"keys.{i}"] for i in range(n_layers)], saved["owner"]
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail deep in safetensors
            log.warning("preserve bank cache %s is unreadable (%s): reading the facts again", path, e)
            return None
        if any(k.shape[0] != owners.shape[0] for k in keys):
            log.warning("preserve bank cache %s is inconsistent: reading the facts again", path)
            return None
        return keys, owners

    def _read(self, editor: Editor) -> tuple[list[Tensor], Tensor]:
        """Every fact's answer-position keys per inner layer (float32, CPU) and each key's fact index."""
        t0 = time.perf_counter()
        keys, owners = self.answer_keys(editor, [(f.prompt, f.answer) for f in self.facts], log_as="facts read")
        log.info("preserve bank: %d keys of %d training facts per layer, read in %.1f s",
                 len(owners), len(self.facts), time.perf_counter() - t0)
        return [k.cpu() for k in keys], owners.cpu()

    @torch.no_grad()
    def answer_keys(self, editor: Editor, pairs: Sequence[tuple[str, str]], params: Mapping[str, Tensor] | None = None,
                    log_as: str | None = None) -> tuple[list[Tensor], Tensor]:
        """The keys (float32) at the answer-predicting positions of each (prompt, answer) pair per inner
        layer, read on the model with `params` (None: the base), and each key's pair index."""
        assert self.spec is not None and editor.formatter is not None
        modules = {p.module_name: self.model.get_submodule(p.module_name) for p in self.inner_params}
        order = {name: j for j, (name, _) in enumerate(self.model.named_modules())}
        deepest = modules[max(modules, key=order.__getitem__)]
        keys: list[list[Tensor]] = [[] for _ in self.inner_params]
        owners: list[Tensor] = []
        progress = Progress(len(pairs), unit="prompt", noun=log_as or "")
        step = self.spec.batch_size
        for start in range(0, len(pairs), step):
            part = pairs[start : start + step]
            batch = editor.formatter.batch([p for p, _ in part], [a for _, a in part]).to(editor.device)
            # The hooks record the inner layers' inputs; nothing after the deepest one is needed.
            with capture_layer_io(modules) as io, forward_stops_after(deepest):
                forward_logits(self.model, batch, params)
            rows = batch.targets != -100  # the answer-predicting positions
            owners.append(torch.arange(start, start + len(part), device=rows.device)[:, None].expand_as(rows)[rows])
            for i, p in enumerate(self.inner_params):
                keys[i].append(io[p.module_name][0][rows].detach().float())
            if log_as and ((start // step) % 10 == 0 or start + step >= len(pairs)):
                log.info("preserve bank: %s", progress.line(min(start + step, len(pairs))))
        return [torch.cat(k) for k in keys], torch.cat(owners)

    @contextmanager
    def scoring(self, batch: EditBatch) -> Iterator[None]:
        """While one training step's outer loss scores `batch`, its in-scope and locality prompts are
        kept out of the bank (ENN's and KE's training_step_scope)."""
        self._avoid = [*batch.inscope_prompts, *batch.loc_prompts] if self.enabled else []
        try:
            yield
        finally:
            self._avoid = []

    def for_step(self, editor: Editor, keys: Sequence[Tensor], edit: LMBatch,
                 requests: Sequence[EditRequest]) -> list[Tensor | None]:
        """√μ K_Pᵀ [d_in, m] per inner parameter, the `preserved` argument of KeyWhitening.gradient: the
        bank keys nearest the edit rows' keys `keys` (one [rows, d_in] per inner parameter; the union
        over the batch), never of a fact about an edited subject or whose prompt is the edit's or one
        the outer loss scores; with `swaps`, the edits' subject swaps (√μ_S K_Sᵀ) beside them. None where
        nothing is left to preserve."""
        self.prepare(editor)
        excluded = self.excluded_rows([r.subject for r in requests], [*(edit.prompts or ()), *self._avoid])
        swapped = self.swap_keys(editor, requests)
        out: list[Tensor | None] = []
        for i, k in enumerate(keys):
            rows = self.nearest(i, k, excluded).unique()
            parts = [*([self.scaled_keys(i, rows)] if len(rows) else []), *([swapped[i]] if swapped else [])]
            out.append(torch.cat(parts).T if parts else None)
        return out

    def swap_prompts(self, requests: Sequence[EditRequest], avoid: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(prompt, the edit's new object) pairs, `swaps` per edit at most: the edit's prompt with its
        subject replaced by another that a training fact names in the same template (the text around
        the subject alike), a seeded choice per prompt. Never an edited subject, an edit's own prompt
        or a prompt in `avoid` (those the outer loss scores). An edit without a subject in its prompt,
        or whose template no training fact shares, gets none."""
        assert self.spec is not None
        if not self.spec.swaps:
            return []
        # No subject that names an edited one or is named in it ("Guinea", "Papua New Guinea"): its
        # prompt in this template may be (or read as) that edit's own, whose key cannot be fitted to
        # its shift and to zero at once.
        edited = sorted({r.subject for r in requests if r.subject})
        inside = "\0".join(edited)  # s in inside: s is part of an edited subject
        banned = {*avoid, *(r.prompt for r in requests)}
        allowed: dict[tuple[str, str], list[str]] = {}  # per template, for this call's edited subjects
        out: list[tuple[str, str]] = []
        for r in requests:
            template = subject_template(r.prompt, r.subject)
            if template is None:
                continue
            before, after = template
            if (before, after) not in allowed:
                allowed[before, after] = [s for s in self._subjects_in(before, after)
                                          if s not in inside and not any(e in s for e in edited)]
            others = [s for s in allowed[before, after] if before + s + after not in banned]
            chosen = random.Random(f"{self.spec.seed}:{r.prompt}").sample(others, min(self.spec.swaps, len(others)))
            out.extend((before + s + after, r.target) for s in chosen)
        return out

    def _subjects_in(self, before: str, after: str) -> list[str]:
        """The subjects the bank's facts name between `before` and `after` (sorted; kept per template)."""
        key = (before, after)
        if key not in self._templates:
            self._templates[key] = sorted({
                f.prompt[len(before):len(f.prompt) - len(after)] for f in self.facts
                if len(f.prompt) > len(before) + len(after) and f.prompt.startswith(before) and f.prompt.endswith(after)
                and f.prompt[len(before):len(f.prompt) - len(after)].strip()})
        return self._templates[key]

    def swap_keys(self, editor: Editor, requests: Sequence[EditRequest], params: Mapping[str, Tensor] | None = None,
                  avoid: Iterable[str] = ()) -> list[Tensor] | None:
        """√μ_S K_S [rows, d_in] per inner layer, float32: the answer-predicting positions' keys of the
        `swap_prompts` followed by the edits' new objects, read on the model with `params` (None: the
        base) and stopped after the deepest inner layer. None when swaps is 0 or no edit has one."""
        assert self.spec is not None
        self.prepare(editor)
        pairs = self.swap_prompts(requests, [*avoid, *self._avoid])
        if not pairs:
            return None
        keys, _ = self.answer_keys(editor, pairs, params)
        return [self.spec.swap_weight ** 0.5 * k for k in keys]

    def excluded_rows(self, subjects: Iterable[str | None], prompts: Iterable[str]) -> Tensor:
        """Bank rows of facts that name one of `subjects` or whose prompt is one of `prompts`."""
        assert self._fact_of_row is not None
        names = [s for s in set(subjects) if s]
        # By the record's subject (a rephrase may name it in another form) and by the name in the text
        # (a neighbourhood prompt of another record may be about an edited subject).
        texts = set(prompts)
        bad = [j for j, f in enumerate(self.facts)
               if f.prompt in texts or (f.subject is not None and f.subject in names)
               or any(s in f.prompt for s in names)]
        mask = torch.zeros(len(self.facts), dtype=torch.bool)
        mask[bad] = True
        return mask.to(self._fact_of_row.device)[self._fact_of_row]

    def nearest(self, i: int, k: Tensor, excluded: Tensor) -> Tensor:
        """Indices of the bank rows of inner layer i nearest (cosine) to each row of keys k, `top_k` each."""
        assert self._keys is not None and self._norms is not None and self.spec is not None
        keys = self._keys[i]
        q = k.detach().to(keys.dtype)
        with torch.autocast(keys.device.type, enabled=False):  # float32 similarities, as the bank
            sims = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ keys.T / self._norms[i]
        sims[:, excluded] = -float("inf")
        kept = min(self.spec.top_k, int((~excluded).sum()))
        if kept == 0:
            return torch.zeros(0, dtype=torch.long, device=keys.device)
        return sims.topk(kept, dim=-1).indices.reshape(-1)

    def scaled_keys(self, i: int, rows: Tensor) -> Tensor:
        """√μ K_P [rows, d_in] for the bank rows `rows` of inner layer i, float32 (K_PᵀK_P is their Gram)."""
        assert self._keys is not None and self.spec is not None
        return self.spec.weight ** 0.5 * self._keys[i][rows]

    def gram(self, i: int, rows: Tensor) -> Tensor:
        """μ K_PᵀK_P [d_in, d_in] over the bank rows `rows` (each once) of inner layer i, float32."""
        assert self._keys is not None and self.spec is not None
        return _gram(self._keys[i][rows.unique()], self.spec.weight)

    def swap_grams(self, editor: Editor, requests: Sequence[EditRequest], params: Mapping[str, Tensor] | None = None,
                   avoid: Iterable[str] = ()) -> list[Tensor] | None:
        """μ_S K_SᵀK_S [d_in, d_in] per inner layer, float32, of `swap_keys` (None where it is)."""
        keys = self.swap_keys(editor, requests, params, avoid)
        return None if keys is None else [_gram(k, 1.0) for k in keys]


def _gram(k: Tensor, weight: float) -> Tensor:
    """weight · KᵀK, float32. Outside autocast: a bf16 KᵀK would lose the small eigenvalues the solve
    divides by (malmen/editor.py normal_terms; a bf16-mixed training run with it collapsed its step sizes)."""
    with torch.autocast(k.device.type, enabled=False):
        k = k.to(torch.promote_types(k.dtype, torch.float32))
        return weight * (k.T @ k)
