"""Edit metrics (DESIGN §3) computed the same way for every editor, in training and evaluation.

Exact mode (the default) scores greedy generation: an answer counts only if greedy decoding
reproduces every target token. Token mode is EasyEdit's teacher-forced per-token accuracy. Both are
computed from teacher-forced passes: greedy reproduces a target iff each token is the argmax given
the previous *target* tokens (induction over positions), so no generation loop is needed except to
find the base model's own greedy answer for out-of-scope inputs.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import torch
from torch import Tensor

from metaedit.data.formatting import Formatter
from metaedit.decoding import greedy_relabel
from metaedit.editors.base import Editor
from metaedit.functional import EditedModel, forward_logits
from metaedit.losses import exact_correct, mean_target_logprob, nll, token_correct, token_kl
from metaedit.prefix import frozen_prefix, with_prefix, with_prefixes
from metaedit.types import EditBatch, LMBatch

EXACT_KEYS = ("edit_acc", "rephrase_acc", "loc_retain", "drawdown")


def post_edit_logits(edited: EditedModel, *batches: LMBatch) -> list[Tensor]:
    """Logits of the edited model for several batches in ONE forward pass (rows stacked)."""
    logits = edited.logits(LMBatch.concat(batches))
    out, start = [], 0
    for b in batches:
        out.append(logits[start : start + len(b), : b.width])
        start += len(b)
    return out


def outer_losses(editor: Editor, batch: EditBatch) -> tuple[Tensor, Tensor, Tensor, EditedModel, Tensor]:
    """Apply the editor and return (L_edit on in-scope rephrases, L_loc KL, pre-edit loc logits,
    edited model, post-edit in-scope logits)."""
    edited = editor.apply_edits(batch.edit, batch.requests)
    post_in, post_loc = post_edit_logits(edited, batch.inscope, batch.loc)
    l_edit = nll(post_in, batch.inscope.targets)
    pre_loc = editor.base_logits(batch.loc)
    l_loc = token_kl(pre_loc, post_loc, batch.loc.kl_mask)
    return l_edit, l_loc, pre_loc, edited, post_in


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_edit_batch(
    editor: Editor, batch: EditBatch, fluency_tokens: int = 0, time_reference: bool = False
) -> dict[str, Tensor]:
    """Per-example outcomes for one batch of edits applied together, plus edit_ms and the losses.

    With the CounterFact batches present (records with a true object) it adds es / ps / ns; with
    `fluency_tokens` > 0 and generation prompts, the n-gram entropy of greedy generations; with
    `time_reference`, the time of one plain forward+backward of the base on the same edit batch
    (`fwd_bwd_ms`, right after the edit so both see the same machine state).
    """
    # Measurement passes replay only the edited tail when that is exact (metaedit.prefix); the edit
    # itself (timed below) gets no precomputed prefix.
    runner = frozen_prefix(editor.model, [p.name for p in editor.inner_params])

    loc = with_prefix(runner, batch.loc)
    pre_loc = editor.base_logits(loc)
    loc_pred = greedy_relabel(editor.base_logits, batch.loc, first_logits=pre_loc)
    pre_gold = exact_correct(pre_loc, batch.loc.targets)
    _sync(editor.device)
    t0 = time.perf_counter()
    edited = editor.apply_edits(batch.edit, batch.requests)
    _sync(editor.device)
    edit_ms = (time.perf_counter() - t0) * 1000
    ref_ms = time_forward_backward(editor.model, batch.edit) if time_reference else None
    cf = [b for b in (batch.edit_true, batch.inscope_true, batch.loc_new) if b is not None]
    # The prefixes of every scored batch in one pass (the locality one is already there).
    scored = with_prefixes(runner, [batch.edit, batch.inscope, loc_pred, loc, *(cf if len(cf) == 3 else [])])
    post_edit, post_in, post_pred, post_gold, *post_cf = post_edit_logits(edited, *scored)
    out = {
        "edit_exact": exact_correct(post_edit, batch.edit.targets).float(),
        "edit_token": token_correct(post_edit, batch.edit.targets),
        "rephrase_exact": exact_correct(post_in, batch.inscope.targets).float(),
        "rephrase_token": token_correct(post_in, batch.inscope.targets),
        "loc_retain_exact": exact_correct(post_pred, loc_pred.targets).float(),
        "loc_retain_token": token_correct(post_pred, loc_pred.targets),
        "loc_pre_exact": pre_gold.float(),
        "loc_post_exact": exact_correct(post_gold, batch.loc.targets).float(),
        "edit_ms": torch.tensor([edit_ms]),
        "loss_edit": nll(post_in, batch.inscope.targets).reshape(1),
        "loss_loc": token_kl(pre_loc, post_gold, batch.loc.kl_mask).reshape(1),
    }
    if ref_ms is not None:
        out["fwd_bwd_ms"] = torch.tensor([ref_ms])
    if post_cf:
        edit_true, in_true, loc_new = post_cf
        # CounterFact: P(new) > P(true) on the edit prompt / paraphrases; P(true) > P(new) on neighbours.
        out["es"] = prefers(post_edit, batch.edit.targets, edit_true, batch.edit_true.targets)  # type: ignore[union-attr]
        out["ps"] = prefers(post_in, batch.inscope.targets, in_true, batch.inscope_true.targets)  # type: ignore[union-attr]
        out["ns"] = prefers(post_gold, batch.loc.targets, loc_new, batch.loc_new.targets)  # type: ignore[union-attr]
    if fluency_tokens > 0 and batch.generation_prompts and editor.formatter is not None:
        texts = generate_texts(edited, editor.formatter, batch.generation_prompts, fluency_tokens)
        out["fluency"] = torch.tensor([ngram_entropy(t) for t in texts])
    return out


def prefers(logits_a: Tensor, targets_a: Tensor, logits_b: Tensor, targets_b: Tensor) -> Tensor:
    """Per example, 1.0 where target string a is more likely than b (mean per-token log-probability,
    as CounterFact compares multi-token objects of different lengths), else 0.0."""
    return (mean_target_logprob(logits_a, targets_a) > mean_target_logprob(logits_b, targets_b)).float()


def time_forward_backward(model: torch.nn.Module, batch: LMBatch) -> float:
    """Milliseconds of what one fine-tuning step costs: forward, loss, backward into every base
    parameter (the yardstick an editor's edit time is compared with)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        _sync(batch.input_ids.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            nll(forward_logits(model, batch), batch.targets).backward()
        _sync(batch.input_ids.device)
        return (time.perf_counter() - t0) * 1000
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)


def generate_texts(edited: EditedModel, formatter: Formatter, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy free generations of the edited model, one prompt at a time (no padding effects)."""
    tok = formatter.tokenizer
    texts = []
    device = next(edited.base.parameters()).device
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").to(device)
        out = edited.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1] :] if formatter.family == "causal_lm" else out[0]
        texts.append(prompt + " " + tok.decode(new, skip_special_tokens=True))
    return texts


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: mean over n of weight_n · entropy (bits) of the text's n-gram
    frequency distribution. Repetitive generations ("Rome Rome Rome ...") score low."""
    words = _WORD.findall(text.lower())
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


class MetricAccumulator:
    """Collects per-example outcomes over batches and reduces them to the DESIGN §3 keys."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}

    def add(self, outcome: dict[str, Tensor]) -> None:
        for k, v in outcome.items():
            self.parts.setdefault(k, []).append(v.detach().float().cpu().reshape(-1))

    def mean(self, key: str) -> float:
        return float(torch.cat(self.parts[key]).mean())

    def summary(self) -> dict[str, float]:
        if not self.parts:
            return {}
        exact = {
            "edit_acc": self.mean("edit_exact"),
            "rephrase_acc": self.mean("rephrase_exact"),
            "loc_retain": self.mean("loc_retain_exact"),
            "drawdown": self.mean("loc_pre_exact") - self.mean("loc_post_exact"),
            "edit_ms": self.mean("edit_ms"),
            "loss_edit": self.mean("loss_edit"),
            "loss_loc": self.mean("loss_loc"),
            "n_edits": float(sum(len(x) for x in self.parts["edit_exact"])),
        }
        if "es" in self.parts:
            es, ps, ns = (self.mean(k) for k in ("es", "ps", "ns"))
            exact.update(es=es, ps=ps, ns=ns, score=harmonic_mean(es, ps, ns))
        if "fluency" in self.parts:
            exact["fluency"] = self.mean("fluency")
        if "fwd_bwd_ms" in self.parts:
            exact["fwd_bwd_ms"] = self.mean("fwd_bwd_ms")
            exact["edit_over_fwd_bwd"] = exact["edit_ms"] / exact["fwd_bwd_ms"]
        return exact

    def token_summary(self) -> dict[str, float]:
        return {
            "edit_acc": self.mean("edit_token"),
            "rephrase_acc": self.mean("rephrase_token"),
            "loc_retain": self.mean("loc_retain_token"),
        }


def harmonic_mean(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)
