"""Typed containers shared by data, editors and the outer loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


class MetaEditError(ValueError):
    """A user-facing error: bad input, config or file. The message names what is wrong."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: make the model answer `target` for `prompt`.

    `subject` (optional) is the entity the fact is about, as it appears in the prompt ("France" in
    "The capital of France is"); locate-then-edit methods (ROME, MEMIT, AlphaEdit) edit the MLP key
    of its last token. Other methods ignore it. An empty subject is read as none.
    """

    prompt: str
    target: str
    subject: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise MetaEditError(f"edit request field '{name}' must be a string, got {type(value).__name__}")
            if not value.strip():
                raise MetaEditError(f"edit request has an empty '{name}' (prompt={self.prompt!r})")
        if self.subject is not None:
            if not isinstance(self.subject, str):
                raise MetaEditError(f"edit request field 'subject' must be a string, got {type(self.subject).__name__}")
            if not self.subject.strip():
                object.__setattr__(self, "subject", None)

    @classmethod
    def coerce(cls, item: EditRequest | Mapping[str, Any] | Sequence[str]) -> EditRequest:
        """Accept EditRequest, {'prompt','target'[,'subject']} dicts or (prompt, target[, subject]) tuples."""
        if isinstance(item, EditRequest):
            return item
        if isinstance(item, Mapping):
            missing = [k for k in ("prompt", "target") if k not in item]
            if missing:
                raise MetaEditError(f"edit request {dict(item)!r} lacks field(s) {missing}")
            return cls(item["prompt"], item["target"], item.get("subject"))
        if isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (2, 3):
            return cls(*item)
        raise MetaEditError(f"cannot read an edit request from {item!r}; give (prompt, target)")


@dataclass
class SequenceState:
    """A sequence of edits part-way: the edited parameters after its first `steps` steps (name ->
    tensor, as `EditedModel.params`) and what the editor accumulated (`Editor.sequence_state`)."""

    steps: int
    params: dict[str, Tensor]
    editor_state: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LMBatch:
    """Tokenised (input, target) pairs in a family-independent layout.

    `targets` is aligned with the model's logits positions (already shifted for causal LMs), -100
    where no target token is predicted. `kl_mask` marks the positions the locality KL averages over
    (the non-padding positions of the sequence whose logits are compared). `prompts` are the rows'
    input texts (without target) when known: text-routed editors (SERAC) score them exactly, since
    decoding a causal row would include the target tokens and a tokenizer round trip is lossy.
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    kl_mask: Tensor
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None
    # Hidden states entering the first edited block ([rows, positions, d]), when a frozen-prefix
    # replay applies (metaedit.prefix); forward passes then run only the blocks from there on.
    prefix: Tensor | None = None
    prompts: list[str] | None = None

    def model_kwargs(self) -> dict[str, Tensor]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = self.decoder_input_ids
            kwargs["decoder_attention_mask"] = self.decoder_attention_mask
        return kwargs

    def to(self, device: torch.device | str) -> LMBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        """Number of logits positions (what `targets` is aligned with)."""
        return int(self.targets.shape[1])

    def select(self, rows: Tensor) -> LMBatch:
        """The rows picked by a boolean mask or index tensor (every per-row field follows)."""
        picked = {
            name: (value[rows] if isinstance(value, Tensor) else
                   None if value is None else [value[i] for i in torch.arange(len(self))[rows].tolist()])
            for name, value in self.__dict__.items()
        }
        return LMBatch(**picked)

    @staticmethod
    def concat(batches: Sequence[LMBatch]) -> LMBatch:
        """Stack the rows of several batches (right-padded to a common width) for one forward pass.

        Right padding is masked out and leaves every real position's logits unchanged, so the logits
        of batch i are rows/columns [offset_i : offset_i + len_i, : batches[i].width] of the result.
        """
        pad_value = {"targets": -100}  # masks pad with 0; padded ids are never attended to

        def cat(name: str) -> Tensor | list[str] | None:
            if name == "prompts":
                texts = [b.prompts for b in batches]
                return None if any(t is None for t in texts) else [p for t in texts for p in t]  # type: ignore[union-attr]
            parts = [getattr(b, name) for b in batches]
            if any(p is None for p in parts):
                return None  # e.g. a prefix that only some batches carry: run all rows in full
            width = max(p.shape[1] for p in parts)
            value = pad_value.get(name, 0)
            # Pad the positions axis (dim 1); a prefix has a feature axis after it.
            return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1]), value=value)
                              for p in parts])

        return LMBatch(**{name: cat(name) for name in LMBatch.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass
class EditBatch:
    """One outer-loop example: n edits, their in-scope rephrases and out-of-scope inputs.

    Texts travel with the tensors because text-based editors (SERAC, KE's conditioning) need them.
    `inscope_owner[j]` is the index of the edit that rephrase j belongs to.
    """

    edit: LMBatch
    inscope: LMBatch
    loc: LMBatch
    requests: list[EditRequest]
    inscope_prompts: list[str]
    inscope_owner: Tensor
    loc_prompts: list[str]
    loc_answers: list[str] = field(default_factory=list)
    # CounterFact comparisons (evaluation only, when every record has a true object): the edit
    # prompts and rephrases scored with the *true* object, the out-of-scope prompts with the *new* one
    # (`loc_new`, which training batches carry too, for the neighbour-margin loss).
    edit_true: LMBatch | None = None
    inscope_true: LMBatch | None = None
    loc_new: LMBatch | None = None
    generation_prompts: list[str] = field(default_factory=list)
    # `loc_owner[j]`: the edit that out-of-scope input j was drawn for (None: unknown).
    loc_owner: Tensor | None = None
    # Logits of the unedited model on `loc`, when already computed (the trainer computes them before
    # a lifelong sequence's running edit is swapped in, so locality stays against the unedited model).
    loc_base: Tensor | None = None
    # Per out-of-scope input, the unedited model's margin log P(answer) − log P(edit's new target)
    # (mean per token, CounterFact's comparison): the reference of the neighbour-margin loss (c_ns).
    loc_margin_base: Tensor | None = None

    @property
    def n_edits(self) -> int:
        return len(self.requests)

    def split(self, size: int) -> list[EditBatch]:
        """Consecutive groups of at most `size` edits, each with its own rephrases and out-of-scope
        inputs (by owner; without `loc_owner` the out-of-scope rows are cut into as many even parts).
        Generation prompts are not carried (they are for evaluation)."""
        n = self.n_edits
        if size >= n:
            return [self]
        parts, n_parts = [], -(-n // size)
        owner = self.inscope_owner.cpu()
        for c, a in enumerate(range(0, n, size)):
            b = min(a + size, n)
            ins = ((owner >= a) & (owner < b)).nonzero().flatten()
            if self.loc_owner is not None:
                lo = self.loc_owner.cpu()
                loc = ((lo >= a) & (lo < b)).nonzero().flatten()
            else:
                loc = torch.arange(c * len(self.loc) // n_parts, (c + 1) * len(self.loc) // n_parts)
            edits = torch.arange(a, b)
            parts.append(EditBatch(
                edit=self.edit.select(edits), inscope=self.inscope.select(ins), loc=self.loc.select(loc),
                requests=self.requests[a:b], inscope_prompts=[self.inscope_prompts[i] for i in ins.tolist()],
                inscope_owner=self.inscope_owner[ins.to(self.inscope_owner.device)] - a,
                loc_prompts=[self.loc_prompts[i] for i in loc.tolist()],
                loc_answers=[self.loc_answers[i] for i in loc.tolist()] if self.loc_answers else [],
                edit_true=None if self.edit_true is None else self.edit_true.select(edits),
                inscope_true=None if self.inscope_true is None else self.inscope_true.select(ins),
                loc_new=None if self.loc_new is None else self.loc_new.select(loc),
                loc_owner=None if self.loc_owner is None else self.loc_owner[loc.to(self.loc_owner.device)] - a,
                loc_base=None if self.loc_base is None else self.loc_base[loc.to(self.loc_base.device)],
                loc_margin_base=(None if self.loc_margin_base is None
                                 else self.loc_margin_base[loc.to(self.loc_margin_base.device)]),
            ))
        return parts

    def to(self, device: torch.device | str) -> EditBatch:
        return replace(
            self,
            edit=self.edit.to(device),
            inscope=self.inscope.to(device),
            loc=self.loc.to(device),
            inscope_owner=self.inscope_owner.to(device),
            **{k: getattr(self, k).to(device) for k in ("edit_true", "inscope_true", "loc_new", "loc_owner", "loc_base",
                                                        "loc_margin_base")
               if getattr(self, k) is not None},
        )
