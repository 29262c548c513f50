"""The SERAC-edited model: the frozen base plus an edit memory, routing each input row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from metaedit.editors.serac.counterfactual import pad_right
from metaedit.editors.serac.memory import EditMemory, edit_text
from metaedit.functional import EditedModel, forward_logits
from metaedit.types import EditRequest, LMBatch, MetaEditError

if TYPE_CHECKING:
    from metaedit.editors.serac.editor import SERACEditor


def select_rows(batch: LMBatch, rows: Tensor) -> LMBatch:
    """The sub-batch of `rows` (same widths, so its logits line up with the full batch's)."""
    picked = {
        k: (v[rows] if isinstance(v, Tensor) else v) for k, v in batch.__dict__.items() if k != "prompts"
    }
    prompts = None if batch.prompts is None else [batch.prompts[i] for i in rows.tolist()]
    return LMBatch(**picked, prompts=prompts)


class SERACEditedModel(EditedModel):
    """f_edited(x) = h(z_i*, x) if g(z_i*, x) > τ else f(x), with i* = argmax_i g(z_i, x).

    Satisfies the EditedModel interface (`logits`, `forward`, `generate`, `detached`); `params` is
    empty because no base parameter changes. `add` appends edits, `clear` rolls every edit back,
    `save_memory` / `SERACEditor.load_memory` persist the memory.
    """

    def __init__(self, editor: SERACEditor, memory: EditMemory) -> None:
        super().__init__(editor.model, {})
        object.__setattr__(self, "editor", editor)  # not a submodule: this object owns no weights
        self.memory = memory
        # One-entry memo of input embeddings: the outer loop scores the same rows again for the
        # classifier loss (SERACEditor.extra_losses), and encoding is the costliest step on a CPU.
        self._memo: tuple[tuple[str, ...], Tensor] | None = None

    # ---- scope --------------------------------------------------------------------------------
    def input_embeddings(self, prompts: Sequence[str]) -> Tensor:
        key = tuple(prompts)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.editor.classifier.embed(list(prompts)))
        return self._memo[1]

    def scope_logits(self, prompts: Sequence[str]) -> Tensor:
        """[len(prompts), len(memory)] logits of g(z_i, x): one batched similarity over the memory."""
        cls = self.editor.classifier
        if not len(self.memory):
            return torch.zeros(len(prompts), 0, device=self.editor.device)
        if cls.mode == "embedding":
            assert self.memory.keys is not None
            return cls.logits_from_embeddings(self.input_embeddings(prompts), self.memory.keys)
        return cls.pair_logits([edit_text(r) for r in self.memory.requests], list(prompts))

    def route(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(index of the best edit, whether its score passes τ) per prompt."""
        n = len(prompts)
        if not len(self.memory):
            zeros = torch.zeros(n, dtype=torch.long, device=self.editor.device)
            return zeros, zeros.bool()
        logits = self.scope_logits(prompts).detach()
        best, index = logits.max(-1)
        return index, torch.sigmoid(best) > self.editor.threshold

    # ---- outputs ------------------------------------------------------------------------------
    def logits(self, batch: LMBatch) -> Tensor:
        prompts = batch.prompts if batch.prompts is not None else self._decode_prompts(batch)
        index, routed = self.route(prompts)
        if not routed.any():
            return forward_logits(self.base, batch)
        cf_rows = routed.nonzero().squeeze(-1)
        cf_logits = self._counterfactual_logits(select_rows(batch, cf_rows), index[cf_rows])
        if routed.all():
            return cf_logits
        base_rows = (~routed).nonzero().squeeze(-1)
        base_logits = forward_logits(self.base, select_rows(batch, base_rows))
        out = cf_logits.new_zeros(len(batch), *cf_logits.shape[1:])
        out = out.index_put((cf_rows,), cf_logits).index_put((base_rows,), base_logits.to(cf_logits.dtype))
        return out

    def _counterfactual_logits(self, batch: LMBatch, edit_index: Tensor) -> Tensor:
        ed = self.editor
        prefixes = [ed.prefix(self.memory.requests[i]) for i in edit_index.tolist()]
        return ed.counterfactual.logits(batch, prefixes, ed.pad_id)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        prompts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Like the base model's forward (logits only). Rows are routed by `prompts` when given,
        else by their decoded tokens — for a causal model that is the whole sequence given."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        family = self.editor.counterfactual.family
        if family == "seq2seq_lm" and decoder_input_ids is not None and decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        width = 1 if family == "seq_classifier" else (
            decoder_input_ids.shape[1] if decoder_input_ids is not None else input_ids.shape[1]
        )
        batch = LMBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            targets=torch.full((len(input_ids), width), -100, device=input_ids.device),
            kl_mask=torch.zeros(len(input_ids), width, dtype=torch.long, device=input_ids.device),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            prompts=list(prompts) if prompts is not None else self._decode(input_ids, attention_mask),
        )
        logits = self.logits(batch)
        if family == "seq_classifier":
            return SequenceClassifierOutput(logits=logits[:, 0])
        return (Seq2SeqLMOutput if family == "seq2seq_lm" else CausalLMOutput)(logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        prompts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Greedy/sampled generation with each row answered by the base or by h(z_i*, x).

        Causal: returns [input; new tokens] per row like `generate` (rows right-padded with pad);
        seq2seq: the decoder sequences.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ed = self.editor
        index, routed = self.route(list(prompts) if prompts is not None else self._decode(input_ids, attention_mask))
        causal = ed.counterfactual.family == "causal_lm"
        kwargs.setdefault("pad_token_id", ed.pad_id)
        parts: list[tuple[Tensor, Tensor]] = []
        if (~routed).any():
            rows = (~routed).nonzero().squeeze(-1)
            parts.append((rows, self.base.generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs)))  # type: ignore[operator]
        if routed.any():
            rows = routed.nonzero().squeeze(-1)
            prefixes = [ed.prefix(self.memory.requests[i]) for i in index[rows].tolist()]
            ids, mask = ed.counterfactual.prefixed_inputs(input_ids[rows], attention_mask[rows], prefixes, ed.pad_id)
            out = ed.counterfactual.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            if causal:  # strip the edit prefix: the caller sees its own input followed by the answer
                out = torch.cat([input_ids[rows], out[:, ids.shape[1] :]], dim=1)
            parts.append((rows, out))
        order = torch.cat([rows for rows, _ in parts])
        stacked = pad_right([out for _, out in parts], ed.pad_id)
        result = torch.empty_like(stacked)
        result[order] = stacked
        return result

    def _decode(self, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        tok = self.editor.tokenizer
        return [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True) for ids, m in zip(input_ids, attention_mask)]

    def _decode_prompts(self, batch: LMBatch) -> list[str]:
        """Rows' prompt texts when a batch carries none: a causal row's tokens up to its first target."""
        if self.editor.counterfactual.family != "causal_lm":
            return self._decode(batch.input_ids, batch.attention_mask)
        mask = batch.attention_mask.clone()
        has_target = (batch.targets != -100).any(-1)
        first = (batch.targets != -100).float().argmax(-1)
        for b in range(len(batch)):
            if has_target[b]:
                mask[b, int(first[b]) + 1 :] = 0  # logits position p predicts token p+1
        return self._decode(batch.input_ids, mask)

    # ---- memory -------------------------------------------------------------------------------
    def add(self, requests: Sequence[EditRequest | Any]) -> SERACEditedModel:
        """Append edits to the memory (in place); returns self."""
        reqs = [EditRequest.coerce(r) for r in requests]
        self.memory.extend(reqs, self.editor.memory_keys(reqs))
        self._memo = None
        return self

    def clear(self) -> SERACEditedModel:
        """Roll back every edit: the model answers exactly like the base again."""
        self.memory.clear()
        self._memo = None
        return self

    def save_memory(self, directory: str | Path) -> Path:
        self.memory.classifier_id = self.editor.classifier_id()
        return self.memory.save(directory)

    def detached(self) -> SERACEditedModel:
        return SERACEditedModel(self.editor, self.memory.detached())

    def save_pretrained(self, directory: str, tokenizer: Any | None = None) -> None:
        """The edited model = the trained editor (classifier + counterfactual model, no base
        weights) in `editor/` + the edit memory in `memory/`; reload with
        `load_editor(dir/'editor').load_memory(dir/'memory')`."""
        self.editor.save_pretrained(str(Path(directory) / "editor"))
        self.save_memory(Path(directory) / "memory")

    def merged(self) -> Any:
        raise MetaEditError(
            "SERAC keeps edits in an explicit memory, not in the weights: there is no merged model. "
            "Use the edited model itself (forward/generate) and save_memory() to keep the edits"
        )
