"""Token positions of a subject inside a prompt, from the tokenizer's character offsets (a subject's
tokens are not a substring of the prompt's tokens in general: BPE merges depend on the context)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from metaedit.types import MetaEditError

log = logging.getLogger(__name__)


def subject_token_span(tokenizer: Any, text: str, subject: str, start: int | None = None) -> tuple[int, int]:
    """[first, last] token indices (inclusive) of `subject` in `tokenizer(text)` (special tokens
    included, as the Formatter tokenises prompts). `start` is the subject's character offset; by
    default its last occurrence in `text` (a context prefixed to a prompt comes first)."""
    begin = text.rfind(subject) if start is None else start
    if not subject or begin < 0:
        raise MetaEditError(f"subject {subject!r} does not occur in {text!r}")
    end = begin + len(subject)
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError:
        raise MetaEditError("locating a subject needs a fast tokenizer (character offsets)") from None
    # Special tokens have empty (0, 0) spans; a token overlaps the subject if its span meets [begin, end).
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > begin]
    if not hits:
        raise MetaEditError(f"subject {subject!r}: no token of {text!r} covers it")
    return hits[0], hits[-1]


def last_token_index(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"]) - 1


_warned_no_subject = False


def subject_row_mask(formatter: Any, batch: Any, requests: Sequence[Any], last_only: bool = False) -> torch.Tensor:
    """[rows, positions] bool mask of each request's subject tokens (`last_only`: its last token) in
    `batch.input_ids`, the prompt stream `formatter` built from the requests' prompts (causal LMs:
    prompt then target; seq2seq/classifiers: the encoder input). A prompt the formatter cut at the
    start shifts positions by what was cut; a subject cut off entirely is an error. A request without
    a subject marks its last prompt token (where the answer is read), logged once."""
    global _warned_no_subject
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for i, req in enumerate(requests):
        n_full = len(formatter.prompt_ids(req.prompt))
        if formatter.family == "causal_lm":
            # The first target's logits sit on the last prompt token (targets are shifted left).
            first = (batch.targets[i] != -100).nonzero()
            n_prompt = int(first[0]) + 1 if len(first) else int(batch.attention_mask[i].sum())
        else:
            n_prompt = int(batch.attention_mask[i].sum())
        shift = n_full - n_prompt  # tokens cut from the start of the prompt (0 normally)
        if req.subject is None:
            if not _warned_no_subject:
                log.warning("edit request %r has no subject: its last prompt token stands in for it "
                            "(further requests without one are not logged)", req.prompt)
                _warned_no_subject = True
            mask[i, n_prompt - 1] = True
            continue
        first_tok, last_tok = subject_token_span(formatter.tokenizer, req.prompt, req.subject)
        if last_tok - shift < 0:
            raise MetaEditError(f"edit request {req.prompt!r}: its subject {req.subject!r} was cut off the start "
                                f"of the prompt (max_length={formatter.max_length}); raise max_length")
        a = last_tok if last_only else max(first_tok, shift)
        mask[i, a - shift : last_tok - shift + 1] = True
    return mask
