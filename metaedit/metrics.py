"""Edit metrics (DESIGN §3) computed the same way for every editor, in training and evaluation.

Exact mode (the default) scores greedy generation: an answer counts only if greedy decoding
reproduces every target token. Token mode is EasyEdit's teacher-forced per-token accuracy. Both are
computed from teacher-forced passes: greedy reproduces a target iff each token is the argmax given
the previous *target* tokens (induction over positions), so no generation loop is needed except to
find the base model's own greedy answer for out-of-scope inputs.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metaedit.data.formatting import Formatter
from metaedit.decoding import greedy_relabel
from metaedit.editors.base import Editor
from metaedit.functional import EditedModel, forward_logits
from metaedit.losses import (
    exact_correct,
    mean_target_logprob,
    nll,
    nll_rows,
    token_correct,
    token_kl,
    token_kl_rows,
)
from metaedit.prefix import FrozenPrefix, frozen_prefix, with_prefix, with_prefixes
from metaedit.progress import Progress
from metaedit.protocols import Protocol, SequenceCheckpoint, apply_protocol
from metaedit.types import EditBatch, LMBatch

log = logging.getLogger(__name__)

EXACT_KEYS = ("edit_acc", "rephrase_acc", "loc_retain", "drawdown")


def post_edit_logits(edited: EditedModel, *batches: LMBatch) -> list[Tensor]:
    """Logits of the edited model for several batches in ONE forward pass (rows stacked)."""
    return stacked_logits(edited.logits, *batches)


def stacked_logits(logits_of: Callable[[LMBatch], Tensor], *batches: LMBatch) -> list[Tensor]:
    """`logits_of` (a model's forward) for several batches in ONE pass: rows stacked, then split."""
    logits = logits_of(LMBatch.concat(batches))
    out, start = [], 0
    for b in batches:
        out.append(logits[start : start + len(b), : b.width])
        start += len(b)
    return out


@dataclass
class OuterLosses:
    """The outer-loop terms of one batch on its edited model."""

    edit: Tensor  # L_edit: NLL of the new targets on the in-scope rephrases
    loc: Tensor  # L_loc: token KL(pre ‖ post) on the out-of-scope inputs
    margin: Tensor | None  # neighbour-margin loss (only when asked for)
    edited: EditedModel
    post_in: Tensor  # post-edit logits of the in-scope rephrases
    post_true: Tensor | None = None  # ... followed by the true object (only when asked for)


def neighbour_margins(loc_logits: Tensor, loc: LMBatch, new_logits: Tensor, loc_new: LMBatch) -> Tensor:
    """Per out-of-scope input: log P(its answer) − log P(the edit's new target), mean per token —
    positive where the model prefers the neighbour's own answer (CounterFact's ns counts those)."""
    return mean_target_logprob(loc_logits, loc.targets) - mean_target_logprob(new_logits, loc_new.targets)


def first_token_margins(loc_logits: Tensor, loc: LMBatch, loc_new: LMBatch) -> Tensor:
    """Per out-of-scope input: log P(first token of its answer) − log P(first token of the edit's new
    target), both read from the logits of the neighbour's OWN row at the position its answer starts —
    so the margin needs no forward of the neighbour with the new target (`loc_new` only supplies that
    token). Exact for one-token targets; for longer ones it is the decision the answer's first token
    makes, where an edit's target first takes over a neighbour."""
    rows = torch.arange(len(loc), device=loc.targets.device)
    start = (loc.targets != -100).int().argmax(-1)  # each row's first answer position
    own = loc.targets[rows, start]
    new = loc_new.targets[rows, (loc_new.targets != -100).int().argmax(-1)]
    logp = torch.log_softmax(loc_logits[rows, start].float(), dim=-1)
    answered = (loc.targets != -100).any(-1) & (loc_new.targets != -100).any(-1)  # a row without answer: no margin
    return (logp[rows, own] - logp[rows, new]) * answered


def inscope_margin_loss(post_in: Tensor, batch: EditBatch, margin: float, post_true: Tensor | None = None) -> Tensor:
    """Mean over the in-scope rows of relu(margin − [log P(new) − log P(true)]). By default on the
    targets' first tokens, both read from the row's own post-edit logits where its target starts (no
    extra forward; `inscope_true` only supplies the true object's first token; a row whose objects
    start alike adds nothing). With `post_true` (the post-edit logits of `batch.inscope_true`, the
    rephrases followed by the true object) on the mean log-probability per target token of each whole
    object — exactly the comparison CounterFact's es / ps make, so a multi-token object whose later
    tokens are unsure (a rare currency's name) is charged too. L_edit alone can raise P(new) and
    P(true) together."""
    if batch.inscope_true is None:
        raise ValueError("the in-scope margin loss (c_es > 0) needs the records' true objects (target_true); "
                         "this batch has none")
    if post_true is not None:
        m = mean_target_logprob(post_in, batch.inscope.targets) - mean_target_logprob(post_true, batch.inscope_true.targets)
        return torch.relu(margin - m).mean()
    m = first_token_margins(post_in, batch.inscope, batch.inscope_true)
    return torch.relu(margin - m).where(m != 0, torch.zeros_like(m)).mean()


def outer_losses(editor: Editor, batch: EditBatch, edited: EditedModel | None = None, margin: bool = False,
                 first_token: bool = False, inscope_true: bool = False) -> OuterLosses:
    """Apply the editor (unless `edited` is given) and compute the outer losses. The pre-edit logits
    are the batch's `loc_base` when it carries them (the unedited model's), else the editor's base
    logits. With `margin`, also the neighbour-margin loss: mean over out-of-scope inputs of
    relu(m_pre − m_post), m = `neighbour_margins` — the KL barely sees the edit's new target gaining
    probability on a neighbour that shares its template, which is exactly what ns counts; this term
    charges every bit of margin the edit takes away (nothing for margin it adds). With `first_token`
    the margin is on the answers' first tokens from the neighbours' own rows (`first_token_margins`):
    no forward of the neighbours with the new target, so it costs next to nothing. With `inscope_true`
    the rephrases followed by the true object go through the same forward (`OuterLosses.post_true`,
    for the whole-object in-scope margin)."""
    if margin and batch.loc_new is None:
        raise ValueError("the neighbour-margin loss (c_ns > 0) needs the batch's loc_new (neighbour prompts with the "
                         "edit's new target); this batch has none")
    if edited is None:
        edited = editor.apply_edits(batch.edit, batch.requests)
    full = margin and not first_token
    if inscope_true and batch.inscope_true is None:
        raise ValueError("the whole-object in-scope margin (c_es > 0, es_first_token false) needs the records' true "
                         "objects (target_true); this batch has none")
    extra = ([batch.loc_new] if full else []) + ([batch.inscope_true] if inscope_true else [])
    post_in, post_loc, *rest = post_edit_logits(edited, batch.inscope, batch.loc, *extra)  # type: ignore[list-item]
    post_new = rest[:1] if full else []
    post_true = rest[-1] if inscope_true else None
    l_edit = nll(post_in, batch.inscope.targets)
    pre_loc = batch.loc_base if batch.loc_base is not None else editor.base_logits(batch.loc)
    l_loc = token_kl(pre_loc, post_loc, batch.loc.kl_mask)
    l_margin = None
    if margin:
        assert batch.loc_new is not None
        pre = batch.loc_margin_base
        if pre is None:
            with torch.no_grad():
                pre = (neighbour_margins(pre_loc, batch.loc, editor.base_logits(batch.loc_new), batch.loc_new) if full
                       else first_token_margins(pre_loc, batch.loc, batch.loc_new))
        post = (neighbour_margins(post_loc, batch.loc, post_new[0], batch.loc_new) if full
                else first_token_margins(post_loc, batch.loc, batch.loc_new))
        l_margin = torch.relu(pre.detach() - post).mean()
    return OuterLosses(l_edit, l_loc, l_margin, edited, post_in, post_true)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Rows per stacked forward when scoring: bounds the logits held at once ([rows, positions, vocab]),
# however many edits a group has, while one record's handful of rows still go in one forward.
MAX_ROWS = 128


def row_ranges(sizes: Sequence[int], max_rows: int) -> list[list[tuple[int, int, int]]]:
    """Forward groups over the rows of several batches: each a list of (batch index, first row, end
    row) holding at most `max_rows` rows in all (a batch may be spread over several groups)."""
    groups: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = max_rows
    for i, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(room, size - start)
            current.append((i, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                groups.append(current)
                current, room = [], max_rows
    if current:
        groups.append(current)
    return groups


def _rows(batch: LMBatch, start: int, end: int) -> LMBatch:
    return batch if (start, end) == (0, len(batch)) else batch.select(torch.arange(start, end))


@dataclass
class PreEdit:
    """What scoring needs from the unedited model about the out-of-scope inputs."""

    loc: LMBatch  # carrying its prefix when it fits one forward
    loc_pred: LMBatch  # the same inputs labelled with the base's own greedy answers
    pre_gold: Tensor  # per input: does the base reproduce the gold answer?
    pre_logits: Tensor | None  # the base's logits, kept when the inputs fit one forward


@torch.no_grad()
def pre_edit_state(editor: Editor, loc: LMBatch, runner: FrozenPrefix | None, max_rows: int = MAX_ROWS) -> PreEdit:
    """Greedy base answers and gold correctness for the out-of-scope inputs, `max_rows` at a time."""
    preds, gold, kept = [], [], None
    for (_, start, end), in row_ranges([len(loc)], max_rows):
        part = with_prefix(runner, _rows(loc, start, end))
        logits = editor.base_logits(part)
        preds.append(greedy_relabel(editor.base_logits, part, first_logits=logits))
        gold.append(exact_correct(logits, part.targets))
        if (start, end) == (0, len(loc)):
            loc, kept = part, logits
    loc_pred = preds[0] if len(preds) == 1 else LMBatch.concat(preds) if preds else loc
    pre_gold = torch.cat(gold) if gold else torch.zeros(0, dtype=torch.bool)
    return PreEdit(loc, loc_pred, pre_gold, kept)


@torch.no_grad()
def score_rows(
    editor: Editor, edited: EditedModel, batches: Sequence[LMBatch], runner: FrozenPrefix | None,
    kl_against: dict[int, Tensor | None] | None = None, max_rows: int = MAX_ROWS, report_rows: int = 2000,
) -> list[dict[str, Tensor]]:
    """Per-row outcomes of `edited` on every row of `batches`, from stacked forwards of at most
    `max_rows` rows: exact / token correctness, mean target log-prob, summed NLL and target-token
    count; for the batches named in `kl_against` (index -> their base logits, or None to recompute)
    also the summed KL from the unedited model and its position count. From `report_rows` rows on,
    progress lines (~10 %) go to the log."""
    kl_against = kl_against or {}
    parts: list[dict[str, list[Tensor]]] = [{} for _ in batches]
    # A group of many edits (1000: ~20k rows, tens of minutes here) says where its scoring is.
    n_rows = sum(len(b) for b in batches)
    progress = Progress(n_rows, unit="row", noun="rows scored") if n_rows >= report_rows else None
    done = 0
    for group in row_ranges([len(b) for b in batches], max_rows):
        pieces = with_prefixes(runner, [_rows(batches[i], a, b) for i, a, b in group])
        for (i, a, b), piece, logits in zip(group, pieces, post_edit_logits(edited, *pieces)):
            stats = {
                "exact": exact_correct(logits, piece.targets).float(),
                "token": token_correct(logits, piece.targets),
                "logprob": mean_target_logprob(logits, piece.targets),
            }
            stats["nll"], stats["n_tokens"] = nll_rows(logits, piece.targets)
            if i in kl_against:
                base = kl_against[i]
                pre = base[a:b] if base is not None else editor.base_logits(piece)
                stats["kl"], stats["kl_positions"] = token_kl_rows(pre, logits, piece.kl_mask)
            for k, v in stats.items():
                parts[i].setdefault(k, []).append(v.float().cpu())
        done += sum(b - a for _, a, b in group)
        if progress is not None and progress.due(done):
            log.info("scoring: %s", progress.line(done))
    keys = ("exact", "token", "logprob", "nll", "n_tokens")
    return [{k: torch.cat(p[k]) if k in p else torch.zeros(0) for k in (*keys, *(("kl", "kl_positions") if i in kl_against else ()))}
            for i, p in enumerate(parts)]


@torch.no_grad()
def evaluate_edit_batch(
    editor: Editor, batch: EditBatch, fluency_tokens: int = 0, time_reference: bool = False,
    protocol: Protocol | None = None, max_rows: int = MAX_ROWS, checkpoint: SequenceCheckpoint | None = None,
) -> dict[str, Tensor]:
    """Per-example outcomes for one group of edits, plus edit_ms and the losses.

    The edits reach the model under `protocol` (default: all applied together, i.e. single for one
    edit, batch for several); the edited model is then scored on every edit, rephrase and
    out-of-scope input of the group in stacked forwards of at most `max_rows` rows, so a group of
    thousands of edits is scored in bounded memory. Locality is against the unedited model.
    With the CounterFact batches present (records with a true object) it adds es / ps / ns; with
    `fluency_tokens` > 0 and generation prompts, the n-gram entropy of greedy generations; with
    `time_reference`, the time of one plain forward+backward of the base on one step's edits
    (`fwd_bwd_ms`, right after the edit so both see the same machine state). A sequential group
    with `checkpoint` saves itself part-way and resumes (`apply_protocol`); the file goes once scored.
    """
    protocol = protocol or Protocol.together(batch.n_edits)
    # Measurement passes replay only the edited tail when that is exact (metaedit.prefix); the edit
    # itself (timed) gets no precomputed prefix.
    runner = frozen_prefix(editor.model, [p.name for p in editor.inner_params])
    pre = pre_edit_state(editor, batch.loc, runner, max_rows)
    edited, edit_ms, _ = apply_protocol(editor, batch, protocol, checkpoint)
    ref_ms = (time_forward_backward(editor.model, _rows(batch.edit, 0, min(len(batch.edit), protocol.step)), max_rows)
              if time_reference else None)
    cf = [b for b in (batch.edit_true, batch.inscope_true, batch.loc_new) if b is not None]
    scored = [batch.edit, batch.inscope, pre.loc_pred, pre.loc, *(cf if len(cf) == 3 else [])]
    s_edit, s_in, s_pred, s_gold, *s_cf = score_rows(editor, edited, scored, runner, {3: pre.pre_logits}, max_rows)
    out = {
        "edit_exact": s_edit["exact"],
        "edit_token": s_edit["token"],
        "rephrase_exact": s_in["exact"],
        "rephrase_token": s_in["token"],
        "loc_retain_exact": s_pred["exact"],
        "loc_retain_token": s_pred["token"],
        "loc_pre_exact": pre.pre_gold.float().cpu(),
        "loc_post_exact": s_gold["exact"],
        "edit_ms": torch.tensor([edit_ms]),
        # Token means over the whole group (Σ per-row sums / Σ counts), as one unchunked pass gives.
        "loss_edit": (s_in["nll"].sum() / s_in["n_tokens"].sum()).reshape(1),
        "loss_loc": (s_gold["kl"].sum() / s_gold["kl_positions"].sum().clamp_min(1.0)).reshape(1),
    }
    if ref_ms is not None:
        out["fwd_bwd_ms"] = torch.tensor([ref_ms])
    if s_cf:
        edit_true, in_true, loc_new = s_cf
        # CounterFact: P(new) > P(true) on the edit prompt / paraphrases; P(true) > P(new) on neighbours.
        out["es"] = (s_edit["logprob"] > edit_true["logprob"]).float()
        out["ps"] = (s_in["logprob"] > in_true["logprob"]).float()
        out["ns"] = (s_gold["logprob"] > loc_new["logprob"]).float()
    if fluency_tokens > 0 and batch.generation_prompts and editor.formatter is not None:
        texts = generate_texts(edited, editor.formatter, batch.generation_prompts, fluency_tokens)
        out["fluency"] = torch.tensor([ngram_entropy(t) for t in texts])
    if checkpoint is not None:
        checkpoint.remove()
    return out


def prefers(logits_a: Tensor, targets_a: Tensor, logits_b: Tensor, targets_b: Tensor) -> Tensor:
    """Per example, 1.0 where target string a is more likely than b (mean per-token log-probability,
    as CounterFact compares multi-token objects of different lengths), else 0.0."""
    return (mean_target_logprob(logits_a, targets_a) > mean_target_logprob(logits_b, targets_b)).float()


def time_forward_backward(model: torch.nn.Module, batch: LMBatch, max_rows: int = MAX_ROWS) -> float:
    """Milliseconds of what one fine-tuning step costs: forward, loss, backward into every base
    parameter (the yardstick an editor's edit time is compared with). Rows go at most `max_rows` at
    a time with gradients accumulated, as a step over a batch of 1000 edits must on a small machine
    (one pass would hold the logits and activations of every row: >20 GB for SmolLM2)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        _sync(batch.input_ids.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            for start in range(0, len(batch), max_rows):
                part = _rows(batch, start, min(len(batch), start + max_rows))
                (nll(forward_logits(model, part), part.targets) * (len(part) / len(batch))).backward()
        _sync(batch.input_ids.device)
        return (time.perf_counter() - t0) * 1000
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)


def generate_texts(edited: EditedModel, formatter: Formatter, prompts: list[str], max_new_tokens: int,
                   rows: int = 32) -> list[str]:
    """Greedy free generations of the edited model, `rows` prompts per `generate` call.

    Decoding one token of one row reads every weight for a handful of FLOPs; rows decoded together
    share those reads (2000 fluency prompts: minutes instead of twenty). Decoder-only prompts are
    padded on the left with an attention mask, from which transformers derives the positions, so
    each row's greedy text is the one it gets alone (pinned by a test)."""
    tok = formatter.tokenizer
    causal = formatter.family == "causal_lm"
    texts: list[str] = []
    device = next(edited.base.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left" if causal else "right"
    try:
        for start in range(0, len(prompts), rows):
            chunk = prompts[start:start + rows]
            ids = tok(chunk, return_tensors="pt", padding=True).to(device)
            out = edited.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[:, ids["input_ids"].shape[1]:] if causal else out
            texts += [prompt + " " + tok.decode(row, skip_special_tokens=True) for prompt, row in zip(chunk, new)]
    finally:
        tok.padding_side = side
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
        rows = torch.cat(self.parts[key])
        return float(rows.mean()) if len(rows) else float("nan")  # nan: no row (e.g. a relation's edits had none)

    def summary(self) -> dict[str, float]:
        if not self.parts:
            return {}
        exact = {
            "edit_acc": self.mean("edit_exact"),
            "rephrase_acc": self.mean("rephrase_exact"),
            "loc_retain": self.mean("loc_retain_exact"),
            "drawdown": self.mean("loc_pre_exact") - self.mean("loc_post_exact"),
            "n_edits": float(sum(len(x) for x in self.parts["edit_exact"])),
        }
        # Per-group values: absent from a relation's share of a group (metaedit.evaluation).
        exact.update({k: self.mean(k) for k in ("edit_ms", "loss_edit", "loss_loc") if k in self.parts})
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
