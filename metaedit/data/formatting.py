"""Turn (prompt, target) text pairs into an `LMBatch` for each model family."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from metaedit.types import LMBatch, MetaEditError

Family = Literal["causal_lm", "seq2seq_lm", "seq_classifier"]
FAMILIES: tuple[str, ...] = ("causal_lm", "seq2seq_lm", "seq_classifier")

log = logging.getLogger(__name__)


class Formatter:
    """Tokenises edit requests consistently for training, evaluation and `editor.edit`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        family: str,
        max_length: int = 128,
        decoder_start_token_id: int | None = None,
        label2id: dict[str, int] | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise MetaEditError(f"unknown model family {family!r}; valid: {list(FAMILIES)}")
        if tokenizer.pad_token_id is None:
            raise MetaEditError("the tokenizer has no pad token; set one (e.g. pad_token = eos_token)")
        self.tokenizer = tokenizer
        self.family = family
        self.max_length = max_length
        self.decoder_start_token_id = (
            decoder_start_token_id if decoder_start_token_id is not None else tokenizer.pad_token_id
        )
        self.label2id = label2id or {}
        # Prompts cut to fit max_length: the first is logged, the rest only counted (no log flood).
        self.n_truncated = 0

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids before any cut to max_length (special tokens as the model expects)."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if self.family == "seq2seq_lm" and self.tokenizer.eos_token_id is not None:
            # Encoder inputs end in EOS as in T5/BART pre-training; add it if the tokenizer did not.
            if not ids or ids[-1] != self.tokenizer.eos_token_id:
                ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def target_ids(self, target: str) -> list[int]:
        # The leading space makes BPE tokenizers produce the in-context form of the first word.
        ids = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise MetaEditError(f"target {target!r} tokenises to nothing")
        return ids

    def _fit_prompt(self, prompt: str, ids: list[int], room: int) -> list[int]:
        """The prompt's last `room` tokens: the answer follows the end of a prompt, so the start goes."""
        if len(ids) <= room:
            return ids
        self.n_truncated += 1
        if self.n_truncated == 1:
            log.warning("prompt %r is %d tokens but only %d fit (max_length=%d): its start is cut off; "
                        "further truncated prompts are counted in Formatter.n_truncated, not logged",
                        prompt, len(ids), room, self.max_length)
        return ids[len(ids) - room :]

    def _check_target(self, target: str, ids: list[int], room: int) -> None:
        # A cut target would train and score a different answer than the one asked for.
        if len(ids) > room:
            raise MetaEditError(f"target {target!r} is {len(ids)} tokens, longer than the {room} that fit in "
                                f"max_length={self.max_length}; shorten it or raise max_length")

    def batch(self, prompts: Sequence[str], targets: Sequence[str]) -> LMBatch:
        if len(prompts) != len(targets):
            raise MetaEditError(f"{len(prompts)} prompts but {len(targets)} targets")
        if not prompts:
            raise MetaEditError("empty batch: no prompts given")
        for p, t in zip(prompts, targets):
            if not p.strip() or not t.strip():
                raise MetaEditError(f"empty prompt or target in pair ({p!r}, {t!r})")
        if self.family == "causal_lm":
            batch = self._causal(prompts, targets)
        elif self.family == "seq2seq_lm":
            batch = self._seq2seq(prompts, targets)
        else:
            batch = self._classifier(prompts, targets)
        batch.prompts = list(prompts)
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def _causal(self, prompts: Sequence[str], targets: Sequence[str]) -> LMBatch:
        ids, tgt = [], []
        for p, t in zip(prompts, targets):
            ti = self.target_ids(t)
            # At least one prompt token must precede the target: its logits predict the first target token.
            self._check_target(t, ti, self.max_length - 1)
            pi = self._fit_prompt(p, self.prompt_ids(p), self.max_length - len(ti))
            n_prompt = len(pi)
            ids.append(pi + ti)
            # logits at position i predict token i+1: targets are the sequence shifted left by one.
            tgt.append([-100] * (n_prompt - 1) + ti + [-100])
        input_ids = self._pad(ids, self.tokenizer.pad_token_id)
        mask = self._pad([[1] * len(r) for r in ids], 0)
        return LMBatch(input_ids, mask, self._pad(tgt, -100), mask.clone())

    def _seq2seq(self, prompts: Sequence[str], targets: Sequence[str]) -> LMBatch:
        tis = [self.target_ids(t) for t in targets]
        for t, ti in zip(targets, tis):
            self._check_target(t, ti, self.max_length)
        enc = [self._fit_prompt(p, self.prompt_ids(p), self.max_length) for p in prompts]
        dec_in = [[self.decoder_start_token_id] + t[:-1] for t in tis]
        dec_mask = self._pad([[1] * len(r) for r in dec_in], 0)
        return LMBatch(
            input_ids=self._pad(enc, self.tokenizer.pad_token_id),
            attention_mask=self._pad([[1] * len(r) for r in enc], 0),
            targets=self._pad(tis, -100),
            kl_mask=dec_mask.clone(),
            decoder_input_ids=self._pad(dec_in, self.tokenizer.pad_token_id),
            decoder_attention_mask=dec_mask,
        )

    def _classifier(self, prompts: Sequence[str], targets: Sequence[str]) -> LMBatch:
        labels = []
        for t in targets:
            key = t.strip()
            if key in self.label2id:
                labels.append(self.label2id[key])
            elif key.isdigit():
                labels.append(int(key))
            else:
                raise MetaEditError(f"classifier target {t!r} is not a label; valid: {sorted(self.label2id)}")
        enc = [self._fit_prompt(p, self.prompt_ids(p), self.max_length) for p in prompts]
        n = len(enc)
        return LMBatch(
            input_ids=self._pad(enc, self.tokenizer.pad_token_id),
            attention_mask=self._pad([[1] * len(r) for r in enc], 0),
            targets=torch.tensor(labels, dtype=torch.long).view(n, 1),
            kl_mask=torch.ones(n, 1, dtype=torch.long),
        )
