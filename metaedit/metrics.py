"""Edit metrics (DESIGN §3) computed the same way for every editor, in training and evaluation.

Exact mode (the default) scores greedy generation: an answer counts only if greedy decoding
reproduces every target token. Token mode is EasyEdit's teacher-forced per-token accuracy. Both are
computed from teacher-forced passes: greedy reproduces a target iff each token is the argmax given
the previous *target* tokens (induction over positions), so no generation loop is needed except to
find the base model's own greedy answer for out-of-scope inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.losses import exact_correct, nll, token_correct, token_kl
from metaedit.types import EditBatch, LMBatch

EXACT_KEYS = ("edit_acc", "rephrase_acc", "loc_retain", "drawdown")


@torch.no_grad()
def greedy_relabel(logits_fn: Callable[[LMBatch], Tensor], batch: LMBatch) -> LMBatch:
    """A copy of `batch` whose target tokens are the model's own greedy answer (same length as gold)."""
    out = replace(
        batch,
        input_ids=batch.input_ids.clone(),
        targets=batch.targets.clone(),
        decoder_input_ids=None if batch.decoder_input_ids is None else batch.decoder_input_ids.clone(),
    )
    valid = out.targets != -100
    classifier = out.decoder_input_ids is None and out.targets.shape[1] != out.input_ids.shape[1]
    # The token predicted at logits position p is fed back as input at p+1 (causal ids or decoder ids).
    feed = None if classifier else (out.input_ids if out.decoder_input_ids is None else out.decoder_input_ids)
    rank = valid.cumsum(-1)
    for j in range(int(valid.sum(-1).max())):
        pred = logits_fn(out).argmax(-1)
        pos = valid & (rank == j + 1)
        out.targets[pos] = pred[pos]
        if feed is not None:
            src = pos[:, :-1]
            feed[:, 1:][src] = pred[:, :-1][src]
    return out


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
def evaluate_edit_batch(editor: Editor, batch: EditBatch) -> dict[str, Tensor]:
    """Per-example outcomes for one batch of edits applied together, plus edit_ms and the losses."""
    loc_pred = greedy_relabel(editor.base_logits, batch.loc)
    pre_loc = editor.base_logits(batch.loc)
    pre_gold = exact_correct(pre_loc, batch.loc.targets)
    _sync(editor.device)
    t0 = time.perf_counter()
    edited = editor.apply_edits(batch.edit, batch.requests)
    _sync(editor.device)
    edit_ms = (time.perf_counter() - t0) * 1000
    post_edit, post_in, post_pred, post_gold = post_edit_logits(edited, batch.edit, batch.inscope, loc_pred, batch.loc)
    return {
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
        return exact

    def token_summary(self) -> dict[str, float]:
        return {
            "edit_acc": self.mean("edit_token"),
            "rephrase_acc": self.mean("rephrase_token"),
            "loc_retain": self.mean("loc_retain_token"),
        }
