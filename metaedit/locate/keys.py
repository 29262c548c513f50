"""Rows to read keys from: a prompt behind a few short random contexts, with the token position of
the subject's last token; and reading module inputs/outputs at those positions.

k* is averaged over contexts (ROME §3.1) so the edit keys on the subject itself, not on one exact
preceding text. Contexts are sampled once from the base model, seeded, and cached by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaedit.data.formatting import Formatter
from metaedit.functional import forward_logits
from metaedit.hooks import captured, forward_stops_after
from metaedit.locate.tokens import last_token_index, subject_token_span
from metaedit.types import EditRequest, LMBatch, MetaEditError

log = logging.getLogger(__name__)
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Row:
    """One text and the token index to read / patch in it (the subject's last token)."""

    text: str
    position: int


@torch.no_grad()
def sample_contexts(model: nn.Module, tokenizer: Any, n: int, length: int, seed: int) -> list[str]:
    """"" plus `n` short texts sampled from the base model, each ending in ". " (a sentence the
    prompt follows). Seeded: the same base model always gets the same contexts."""
    contexts = [""]
    if n <= 0:
        return contexts
    device = next(model.parameters()).device
    starts = [CONTEXT_STARTS[i % len(CONTEXT_STARTS)] for i in range(n)]
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        enc = tokenizer(starts, return_tensors="pt", padding=True).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length,
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    generated = out if getattr(model.config, "is_encoder_decoder", False) else out[:, enc["input_ids"].shape[1] :]
    for start, row in zip(starts, generated):
        text = (start + tokenizer.decode(row, skip_special_tokens=True)).replace("{", " ").replace("}", " ")
        contexts.append(" ".join(text.split()) + ". ")
    return contexts


def request_rows(tokenizer: Any, request: EditRequest, contexts: Sequence[str], fallback: str,
                 prompt: str | None = None, fact_token: str = "subject_last") -> list[Row]:
    """`context + prompt` for each context with the index of the token whose key is edited: the
    subject's last token (`fact_token="subject_last"`, ROME's choice) or the prompt's last token
    (`"last"`, for models that recall facts there). `prompt` defaults to the request's; a request
    without a subject uses its last prompt token when `fallback` is "last_token" and raises otherwise."""
    if fact_token not in ("subject_last", "last"):
        raise MetaEditError(f"fact_token must be 'subject_last' or 'last', got {fact_token!r}")
    prompt = request.prompt if prompt is None else prompt
    rows = []
    for ctx in contexts:
        text = ctx + prompt
        if fact_token == "last":
            rows.append(Row(text, last_token_index(tokenizer, text)))
            continue
        if request.subject is None:
            if fallback != "last_token":
                raise MetaEditError(f"edit request {request.prompt!r} -> {request.target!r} has no subject, which "
                                    f"this method needs (or set subject_fallback=last_token)")
            rows.append(Row(text, last_token_index(tokenizer, text)))
            continue
        at = prompt.find(request.subject)
        if at < 0:
            raise MetaEditError(f"edit request {request.prompt!r}: subject {request.subject!r} does not occur in "
                                f"the prompt {prompt!r}")
        rows.append(Row(text, subject_token_span(tokenizer, text, request.subject, start=len(ctx) + at)[1]))
    return rows


def batch_rows(formatter: Formatter, rows: Sequence[Row], targets: Sequence[str], device: torch.device) -> LMBatch:
    """The rows as one batch with their targets; a cut prompt would shift every position, so the
    rows must fit max_length whole."""
    before = formatter.n_truncated
    batch = formatter.batch([r.text for r in rows], list(targets))
    if formatter.n_truncated != before:
        formatter.n_truncated = before
        raise MetaEditError(f"locate-then-edit: a prompt with its context does not fit max_length="
                            f"{formatter.max_length} ({rows[0].text!r}); shorten it or raise the model's max_length")
    return batch.to(device)


def at_positions(x: Tensor, positions: Sequence[int]) -> Tensor:
    """x[i, positions[i]] for each row: [rows, d]."""
    idx = torch.as_tensor(list(positions), device=x.device)
    return x[torch.arange(len(idx), device=x.device), idx]


def read_at(model: nn.Module, batch: LMBatch, positions: Sequence[int], params: Mapping[str, Tensor],
            inputs: Mapping[str, nn.Module] | None = None, outputs: Mapping[str, nn.Module] | None = None,
            stop_after: nn.Module | None = None, chunk: int = 256) -> dict[str, Tensor]:
    """Module inputs (`inputs`) / outputs (`outputs`) at one position per row, for the model edited
    by `params`: {key: [rows, d]} (float32, no grad). Rows go `chunk` at a time (a batch of 1000
    edits is 6000+ rows: one forward over all of them would hold gigabytes of activations), and
    the forward stops after `stop_after` (the deepest block read) when given."""
    pos = list(positions)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(batch), chunk):
        rows = torch.arange(start, min(start + chunk, len(batch)), device=batch.input_ids.device)
        part = batch if len(rows) == len(batch) else batch.select(rows)
        with torch.no_grad(), captured(inputs=inputs, outputs=outputs) as store, forward_stops_after(stop_after):
            forward_logits(model, part, params)
        for k, v in store.items():
            parts.setdefault(k, []).append(at_positions(v, pos[start : start + len(rows)]).float())
    return {k: torch.cat(v) for k, v in parts.items()}


def group_mean(x: Tensor, groups: int) -> Tensor:
    """[groups * per_group, d] rows (grouped consecutively) -> [d, groups] column means."""
    return x.reshape(groups, -1, x.shape[-1]).mean(1).T
