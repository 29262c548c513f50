"""Greedy answers from teacher-forced passes: shared by the metrics and by editors that condition on
the model's current answer (KE), so it sits below both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from metaedit.types import LMBatch


@torch.no_grad()
def greedy_relabel(logits_fn: Callable[[LMBatch], Tensor], batch: LMBatch, first_logits: Tensor | None = None) -> LMBatch:
    """A copy of `batch` whose target tokens are the model's own greedy answer (same length as gold).

    `first_logits`, when given, are `logits_fn(batch)` already computed by the caller: the first
    answer token needs nothing fed back, so for one-token answers no further pass is run. Later
    passes run only the rows whose answers are still being decoded.
    """
    out = replace(
        batch,
        prefix=None,  # input ids change below, so any cached prefix would be stale
        input_ids=batch.input_ids.clone(),
        targets=batch.targets.clone(),
        decoder_input_ids=None if batch.decoder_input_ids is None else batch.decoder_input_ids.clone(),
    )
    valid = out.targets != -100
    classifier = out.decoder_input_ids is None and out.targets.shape[1] != out.input_ids.shape[1]
    # The token predicted at logits position p is fed back as input at p+1 (causal ids or decoder ids).
    feed = None if classifier else (out.input_ids if out.decoder_input_ids is None else out.decoder_input_ids)
    rank = valid.cumsum(-1)
    lengths = valid.sum(-1)
    for j in range(int(lengths.max())):
        active = lengths > j
        if j == 0 and first_logits is not None:
            pred = first_logits[:, : out.width].argmax(-1)
        else:
            pred = torch.zeros_like(out.targets)
            pred[active] = logits_fn(out.select(active))[:, : out.width].argmax(-1)
        pos = valid & (rank == j + 1)
        out.targets[pos] = pred[pos]
        if feed is not None:
            src = pos[:, :-1]
            feed[:, 1:][src] = pred[:, :-1][src]
    return out
