"""Which positions' (u, δ) pairs make an edit's gradient, for editors that build their update from
the edit-loss gradient of inner matrices (KE, first-order ENN; MEND selects rows of its own).

For y = W u the gradient of a row's loss is Σ_t δ_t u_tᵀ over its positions. "nonpad" keeps every
position (the plain gradient); "subject" / "subject_last" keep the subject's tokens / its last token
on the stream the prompt is read on: neighbourhood prompts share the edit's template, not its
subject, so an update built from the subject's key moves their answers less (DESIGN §2, locality).
"target" keeps the positions whose logits score the answer (a causal LM's last prompt token and
the target's own tokens but the last): MALMEN's placement at the last blocks, where the answer is
written rather than recalled. "answer" keeps only the first of them, the position that predicts the
answer's first token: one key per edit, and none read inside the target, whose tokens a neighbour's
answer is scored on as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metaedit.functional import forward_logits
from metaedit.hooks import capture_layer_io
from metaedit.locate.tokens import subject_row_mask
from metaedit.losses import nll
from metaedit.models.inner_params import InnerParam
from metaedit.types import EditRequest, LMBatch, MetaEditError

GRADIENT_ROWS = ("nonpad", "subject", "subject_last", "target", "answer")


def answer_mask(targets: Tensor, first_only: bool = False) -> Tensor:
    """[batch, seq] bool: the positions whose logits score the target (labels not -100), or with
    `first_only` only the first of them in each row (the position that predicts the answer)."""
    scored = targets != -100
    return scored & (scored.cumsum(-1) == 1) if first_only else scored


def check_rows(method: str, rows: str, model: Any) -> None:
    if rows not in GRADIENT_ROWS:
        raise MetaEditError(f"{method} rows must be one of {list(GRADIENT_ROWS)}, got {rows!r}")
    if rows in ("target", "answer") and getattr(model.config, "is_encoder_decoder", False):
        raise MetaEditError(f"{method} rows={rows!r} is for causal LMs: a seq2seq decoder reads only the target, so "
                            f"its rows are the target's already (use rows=nonpad)")


def per_edit_gradients(
    model: Any,
    inner_params: Sequence[InnerParam],
    edit: LMBatch,
    rows: str = "nonpad",
    formatter: Any = None,
    requests: Sequence[EditRequest] | None = None,
    params: Mapping[str, Tensor] | None = None,
    summed: bool = False,
    keys: list[Tensor] | None = None,
) -> list[Tensor]:
    """∇W_i of the summed edit loss for each inner matrix and edit i: [n_edits, d_out, d_in], from one
    forward and a backward that stops at the earliest inner layer (capture_layer_io), at the model's
    weights or at `params` (a functional view). Rows of a batch do not interact, so per-edit
    gradients are per-row sums of the captured (u, δ); subject modes sum the subject's positions only
    (`requests` give the subjects, `formatter` their token positions). `summed`: the batch's total
    [d_out, d_in] instead, without materialising one matrix per edit. `keys`, when given (rows other
    than nonpad), receives each inner matrix's kept keys u [kept rows, d_in]: preserve looks up its
    nearest bank keys by them."""
    keep = None
    if rows in ("target", "answer"):  # a causal LM's (check_rows refuses them for seq2seq)
        keep = answer_mask(edit.targets, first_only=rows == "answer")
    elif rows != "nonpad":
        if requests is None or len(requests) != len(edit) or formatter is None:
            raise MetaEditError(f"rows={rows!r} needs the tokenizer and one edit request per edit")
        keep = subject_row_mask(formatter, edit, requests, last_only=rows == "subject_last")
    modules = {p.module_name: model.get_submodule(p.module_name) for p in inner_params}
    with torch.enable_grad(), capture_layer_io(modules) as io:
        # Summed over tokens: a per-edit gradient does not depend on which other edits share the batch.
        loss = nll(forward_logits(model, edit, params), edit.targets, reduction="sum")
        deltas = torch.autograd.grad(loss, [io[p.module_name][1] for p in inner_params])
    grads = []
    for p, d in zip(inner_params, deltas):
        u = io[p.module_name][0].float()
        # The prompt is read on the input stream (a causal LM's only one); a seq2seq decoder sees
        # only the target, so its layers keep every position.
        if keep is not None and (p.side == "input" or edit.decoder_input_ids is None):
            u = u * keep.to(u.device).unsqueeze(-1)
        grads.append(torch.einsum("bto,bti->oi" if summed else "bto,bti->boi", d.detach().float(), u))
        if keys is not None:
            if keep is None:
                raise MetaEditError("per_edit_gradients: keys are the kept rows' and need rows other than nonpad")
            keys.append(u[keep.to(u.device)])
    return grads
