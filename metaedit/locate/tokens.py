"""Token positions of a subject inside a prompt, from the tokenizer's character offsets (a subject's
tokens are not a substring of the prompt's tokens in general: BPE merges depend on the context)."""

from __future__ import annotations

from typing import Any

from metaedit.types import MetaEditError


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
