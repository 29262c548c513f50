"""SERAC's counterfactual model h(z, x): a small model with the base's tokenizer and output space
that answers x as if edit z were true, given z prepended to x.

Default: a truncated copy of the base — its embeddings, head and first `n_layers` blocks (first
`n_layers` encoder and decoder blocks for a seq2seq base, first blocks + head for a classifier) —
then fine-tuned. Built from the base's own class and config, so every family and architecture the
base loader supports works without per-architecture code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.data.formatting import Formatter
from metaedit.functional import logits_of
from metaedit.types import EditRequest, LMBatch, MetaEditError

# Config fields that count transformer blocks, across transformers architectures.
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


def truncated_copy(model: PreTrainedModel, n_layers: int) -> PreTrainedModel:
    """A new model of the base's class with its first `n_layers` blocks (per stack) and everything
    else (embeddings, final norms, head) copied from the base; the base is only read."""
    config = copy.deepcopy(model.config)
    found = False
    for name in LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            setattr(config, name, min(n_layers, value))
            found = True
    if not found:
        raise MetaEditError(f"serac: cannot find the layer count in the {type(config).__name__} of the base model")
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]
    small = type(model)(config).to(dtype=next(model.parameters()).dtype)
    base_state = model.state_dict()
    result = small.load_state_dict(base_state, strict=False)
    if result.missing_keys:
        raise MetaEditError(f"serac: truncated copy of the base lacks {result.missing_keys[:5]} (not in the base)")
    small.eval()
    return small


class Counterfactual(nn.Module):
    """h(z, x): runs the small model on [edit tokens; separator; input tokens].

    Args:
        model: the (truncated) small model.
        family: the base's family (causal_lm, seq2seq_lm, seq_classifier).
        train_embeddings: fine-tune the token embeddings and output head too. Off by default: only
            the tokens seen in training would move, so the rows of tokens first met at test time
            (unseen subjects, targets) would no longer match the rest; frozen, they stay the base's
            and are not stored in checkpoints.
    """

    def __init__(self, model: PreTrainedModel, family: str, train_embeddings: bool = False) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.model.requires_grad_(True)
        if not train_embeddings:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    module.requires_grad_(False)
        cfg = model.config
        self.max_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    def prefix_ids(self, formatter: Formatter, request: EditRequest) -> list[int]:
        """z as tokens: "prompt target" then a separator (the tokenizer's SEP, else EOS, else pad)."""
        tok = formatter.tokenizer
        sep = next(t for t in (tok.sep_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None)
        ids = tok(request.prompt, add_special_tokens=False)["input_ids"]
        return ids + formatter.target_ids(request.target) + [sep]

    def logits(self, batch: LMBatch, prefixes: Sequence[Sequence[int]], pad_id: int) -> Tensor:
        """Logits aligned with `batch`'s logits positions ([B, width, V]) for row b given prefix b."""
        ids, mask = batch.input_ids, batch.attention_mask
        lengths = mask.sum(-1).tolist()
        starts = mask.float().argmax(-1).tolist()  # first real token (rows may be left-padded)
        rows, offsets = [], []
        for b, prefix in enumerate(prefixes):
            real = ids[b, starts[b] : starts[b] + lengths[b]].tolist()
            prefix = list(prefix)
            if self.max_positions and len(prefix) + len(real) > self.max_positions:
                # Keep the end of the prefix (the target and separator) when the sequence is too long.
                prefix = prefix[len(prefix) + len(real) - self.max_positions :]
            rows.append(prefix + real)
            offsets.append(len(prefix) - starts[b])
        width = max(len(r) for r in rows)
        device = ids.device
        cf_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        cf_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        kwargs = {"input_ids": cf_ids, "attention_mask": cf_mask}
        if batch.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = batch.decoder_input_ids
            kwargs["decoder_attention_mask"] = batch.decoder_attention_mask
        out = logits_of(self.model(**kwargs))
        if self.family != "causal_lm":
            return out  # decoder / classifier positions are unchanged by the encoder-side prefix
        # Causal: original position p of row b sits at p + offset_b in the prefixed sequence.
        pos = torch.arange(ids.shape[1], device=device).unsqueeze(0) + torch.tensor(offsets, device=device).unsqueeze(1)
        pos = pos.clamp(0, width - 1)
        return out.gather(1, pos.unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    def prefixed_inputs(
        self, input_ids: Tensor, attention_mask: Tensor, prefixes: Sequence[Sequence[int]], pad_id: int
    ) -> tuple[Tensor, Tensor]:
        """[prefix; real tokens] rows for `generate`: left-padded for a causal model (generation
        continues from the last column), right-padded for an encoder."""
        lengths = attention_mask.sum(-1).tolist()
        starts = attention_mask.float().argmax(-1).tolist()
        rows = [list(p) + input_ids[b, starts[b] : starts[b] + lengths[b]].tolist() for b, p in enumerate(prefixes)]
        width = max(len(r) for r in rows)
        left = self.family == "causal_lm"
        padded = [([pad_id] * (width - len(r)) + r) if left else (r + [pad_id] * (width - len(r))) for r in rows]
        masks = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
        device = input_ids.device
        return torch.tensor(padded, device=device), torch.tensor(masks, device=device)


def pad_right(rows: list[Tensor], value: int) -> Tensor:
    width = max(r.shape[-1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[-1]), value=value) for r in rows])
