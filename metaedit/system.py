"""The one generic LightningModule: the outer loop of every learned editor."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch

from metaedit.editors.base import Editor
from metaedit.functional import EditedModel
from metaedit.losses import exact_correct, nll
from metaedit.metrics import (
    MetricAccumulator,
    evaluate_edit_batch,
    first_token_margins,
    inscope_margin_loss,
    neighbour_margins,
    outer_losses,
    stacked_logits,
)
from metaedit.prefix import PrefixCache, frozen_prefix
from metaedit.types import EditBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lifelong:
    """RLEdit-style lifelong meta-training: training steps form sequences of `seq_len` edit batches,
    each edited from the model the earlier steps of the sequence already edited. The outer loss of a
    step adds, for the batches of the previous `steps_back` steps, c_edit·γ^age·L_edit of their
    rephrases on the model edited now (so an update that undoes earlier edits is penalised), and
    `l2`·Σ_ℓ ‖ΔW_ℓ‖²_F on this step's weight change. Earlier shifts are constants (detached)."""

    steps_back: int = 3
    gamma: float = 0.9
    l2: float = 0.0
    seq_len: int = 8

    def __post_init__(self) -> None:
        if self.steps_back < 0 or self.seq_len < 1 or not 0 <= self.gamma <= 1 or self.l2 < 0:
            raise ValueError(f"lifelong needs steps_back >= 0, seq_len >= 1, 0 <= gamma <= 1, l2 >= 0; got {self}")


class EditorSystem(pl.LightningModule):
    """Meta-trains `editor`: θ' = Edit_φ(θ, z_e); minimise c_edit·L_edit(θ') + c_loc·L_loc(θ, θ')
    (+ the editor's own extra terms) w.r.t. the editor's trainable parameters.

    Optimisation is manual so a non-finite step can be skipped cleanly (no optimizer-state update)
    and identically on every DDP rank.
    """

    def __init__(
        self,
        editor: Editor,
        c_edit: float = 0.1,
        c_loc: float = 1.0,
        c_ns: float = 0.0,
        margin_first_token: bool = False,
        c_es: float = 0.0,
        es_margin: float = 1.0,
        es_first_token: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        grad_clip: float = 100.0,
        accumulate: int = 1,
        max_nonfinite: int = 10,
        schedule: str = "constant",
        warmup_steps: int = 0,
        prefix_cache: bool = True,
        lifelong: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Base weights are never part of a Lightning checkpoint (see on_save_checkpoint).
        self.strict_loading = False
        self.editor = editor
        self.base = editor.model  # registered so Lightning moves it to the right device
        self.c_edit, self.c_loc = c_edit, c_loc
        # Weight of the neighbour-margin loss (metrics.outer_losses); 0 leaves the reference objective.
        if c_ns < 0:
            raise ValueError(f"method.loss.c_ns must be >= 0, got {c_ns}")
        self.c_ns = c_ns
        # The margin from the neighbours' own rows only (metrics.first_token_margins), no forward of
        # them with the edit's target: the margin loss then costs next to nothing.
        self.margin_first_token = margin_first_token
        # Weight of the in-scope margin loss (`inscope_margin_loss`): L_edit only raises P(new), and an
        # update that raises P(true) with it (an answer of the right kind, not the new one) lands no
        # CounterFact edit; this term asks the new target's first token to beat the true one's.
        if c_es < 0:
            raise ValueError(f"method.loss.c_es must be >= 0, got {c_es}")
        self.c_es, self.es_margin = c_es, es_margin
        # false: the margin between the whole objects' mean token log-probabilities, as es / ps compare
        # them; costs the rephrases' forward with the true object (in the same stacked pass).
        self.es_first_token = es_first_token
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.accumulate, self.max_nonfinite = max(1, accumulate), max_nonfinite
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {schedule!r}")
        self.schedule, self.warmup_steps = schedule, warmup_steps
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self._val = MetricAccumulator()
        self._finite = False
        self.lifelong = Lifelong(**lifelong) if lifelong else None
        # Lifelong state: the running edit of the current sequence, its earlier batches, its length.
        self._running: dict[str, torch.Tensor] = {}
        self._history: deque[EditBatch] = deque(maxlen=self.lifelong.steps_back if self.lifelong else 0)
        self._seq_step = 0
        self._last_edited: EditedModel | None = None
        # Frozen-prefix replay (metaedit.prefix): the base's blocks before the first inner param are
        # run once per distinct input for the whole run instead of in every step.
        runner = frozen_prefix(editor.model, [p.name for p in editor.inner_params]) if prefix_cache else None
        self.prefix = PrefixCache(runner) if runner is not None else None
        if self.prefix is not None:
            log.info("frozen-prefix replay: blocks before %s.%d run once per input", runner.blocks_name, runner.start)

    def train(self, mode: bool = True) -> EditorSystem:
        # The base model stays in eval mode: dropout in it would make L_loc measure noise.
        super().train(mode)
        self.base.eval()
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in self.editor.param_groups(self.lr) if g["params"]]
        # fused Adam: one kernel for all tensors (the per-tensor loop dominates a small editor's step).
        opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        total = max(1, self.trainer.max_steps) if self.trainer.max_steps > 0 else None
        warm, cosine = self.warmup_steps, self.schedule == "cosine" and total is not None

        def factor(step: int) -> float:
            w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
            if not cosine:
                return w
            progress = min(1.0, step / total)  # type: ignore[operator]
            return w * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor)}

    def transfer_batch_to_device(self, batch: EditBatch, device: torch.device, dataloader_idx: int) -> EditBatch:
        return batch.to(device)

    def _objective(self, batch: EditBatch, edited: EditedModel | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The outer loss of `batch` on `edited` (default: the editor applied to the batch's edits)."""
        terms = outer_losses(self.editor, batch, edited, margin=self.c_ns > 0, first_token=self.margin_first_token,
                             inscope_true=self._whole_object_es)
        edited = terms.edited
        success = exact_correct(terms.post_in.detach(), batch.inscope.targets).float().mean()
        loss = self.editor.outer_objective(terms.edit, terms.loc, self.c_edit, self.c_loc, edit_success=success)
        logs = {"loss_edit": terms.edit.detach(), "loss_loc": terms.loc.detach()}
        if terms.margin is not None:
            loss = loss + self.c_ns * terms.margin
            logs["loss_margin"] = terms.margin.detach()
        if self.c_es > 0:
            l_es = inscope_margin_loss(terms.post_in, batch, self.es_margin, terms.post_true)
            loss = loss + self.c_es * l_es
            logs["loss_es_margin"] = l_es.detach()
        for name, term in self.editor.extra_losses(batch, edited).items():
            loss = loss + term
            logs[f"loss_{name}"] = term.detach()
        logs["rephrase_acc"] = success
        if self.lifelong is not None:
            loss = loss + self._lifelong_terms(edited, logs)
        logs["loss"] = loss.detach()
        self._last_edited = edited
        return loss, logs

    @property
    def _whole_object_es(self) -> bool:
        return self.c_es > 0 and not self.es_first_token

    def _lifelong_terms(self, edited: EditedModel, logs: dict[str, torch.Tensor]) -> torch.Tensor:
        """c_edit·Σ_age γ^age·L_edit(earlier batch) on the model edited now, plus l2·Σ‖ΔW‖²; ΔW is
        measured from the weights this step started from (the running edit, or the base's own)."""
        assert self.lifelong is not None
        extra = torch.zeros((), device=self.device)
        prev = torch.zeros((), device=self.device)
        for age, old in enumerate(reversed(self._history), start=1):
            prev = prev + self.lifelong.gamma**age * nll(edited.logits(old.inscope), old.inscope.targets)
        if self._history:
            extra = extra + self.c_edit * prev
            logs["loss_edit_prev"] = prev.detach()
        if self.lifelong.l2 > 0:
            # Inside the trainer's editing_from(running) the model's parameters are the running edit.
            l2 = sum(((v - self.base.get_parameter(n)).float() ** 2).sum() for n, v in edited.params.items())
            extra = extra + self.lifelong.l2 * l2
            logs["loss_l2"] = l2.detach()  # type: ignore[union-attr]
        return extra

    def _advance_sequence(self, batch: EditBatch, finite: bool) -> None:
        """Keep this step's edit as the start of the next one, until the sequence ends (or a
        non-finite step makes the running edit unusable)."""
        if self.lifelong is None:
            return
        self._seq_step += 1
        if not finite or self._last_edited is None or self._seq_step >= self.lifelong.seq_len:
            self._running, self._seq_step = {}, 0
            self._history.clear()
        else:
            self._running = {n: v.detach() for n, v in self._last_edited.params.items()}
            if self.lifelong.steps_back > 0:
                self._history.append(replace(batch, loc_base=None))
        self._last_edited = None

    def _backward(self, loss: torch.Tensor, check: torch.Tensor | None = None) -> None:
        """Back-propagate `loss` (scaled for accumulation) unless `check` (default: the loss) is not
        finite on some rank; every rank must take the same decision, or DDP's gradient all-reduce
        would deadlock."""
        value = loss if check is None else check
        self._finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(value)), all=True)
        if self._finite:
            self.manual_backward(loss / self.accumulate)

    def outer_step(self, batch: EditBatch) -> tuple[dict[str, torch.Tensor], bool]:
        """Outer loss and backward of one training batch (no optimizer step); (logs, finite)."""
        margin = self.c_ns > 0 and batch.loc_new is not None
        full = margin and not self.margin_first_token  # the neighbours are also run with the edit's target
        if self.prefix is not None:
            # Every batch the edited model runs gets its replayed prefix (a stacked forward of batches
            # with and without one would run all rows in full).
            run = {"edit", "inscope", "loc"} | ({"loc_new"} if full else set()) | (
                {"inscope_true"} if self._whole_object_es else set())
            batch = replace(batch, **{k: self.prefix.attach(getattr(batch, k)) for k in run if getattr(batch, k) is not None})
        with torch.no_grad():
            if full:  # the neighbours with their answers and with the edit's target, in one base forward
                loc_base, new_base = stacked_logits(self.editor.base_logits, batch.loc, batch.loc_new)
                batch = replace(batch, loc_base=loc_base,
                                loc_margin_base=neighbour_margins(loc_base, batch.loc, new_base, batch.loc_new))
            else:
                batch = replace(batch, loc_base=self.editor.base_logits(batch.loc))
                if margin:
                    batch = replace(batch, loc_margin_base=first_token_margins(batch.loc_base, batch.loc, batch.loc_new))
        self._finite = False
        # A lifelong sequence edits from its running edit (the editor sees it as its base weights);
        # locality stays against the unedited model (loc_base, computed above, outside it).
        if not self._running:
            # A new sequence (every step, without lifelong): forget what the editor kept over the last one.
            self.editor.reset_sequence()
        with self.editor.editing_from(self._running):
            logs = self.editor.training_loss_and_backward(batch, self._objective, self._backward)
        self._advance_sequence(batch, self._finite)
        return logs, self._finite

    def forward_backward(self, batch: EditBatch) -> None:
        """One step's outer loss and backward on `batch` — no update, no gradient, no sequence state kept
        (what `trainer.precision=auto` times in fp32 and in bf16 before training; see metaedit/precision.py)."""
        with torch.no_grad():
            batch = replace(batch, loc_base=self.editor.base_logits(batch.loc))
            buffers = {name: b.clone() for name, b in self.editor.named_buffers()}  # e.g. MEND's running norms
        lifelong, self.lifelong = self.lifelong, None
        try:
            self.editor.training_loss_and_backward(batch, self._objective, lambda loss, check=None: loss.backward())
        finally:
            self.lifelong, self._last_edited = lifelong, None
            self.editor.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in self.editor.named_buffers():
                    b.copy_(buffers[name])

    def training_step(self, batch: EditBatch, batch_idx: int) -> None:
        opt = self.optimizers()
        logs, finite = self.outer_step(batch)
        if (batch_idx + 1) % self.accumulate == 0 or not finite:
            params = [p for p in self.editor.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip) if finite else torch.tensor(math.nan)
            if finite and torch.isfinite(norm):
                opt.step()
                self.lr_schedulers().step()
                # The rate the next step runs with (the schedule's progress, in metrics.csv / W&B).
                logs["lr"] = torch.tensor(float(opt.param_groups[0]["lr"]))
                self.nonfinite_in_row = 0
                logs["grad_norm"] = norm.detach()
                self._log_editor_state(batch.n_edits)
            else:
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                log.warning("skipped a non-finite step (%d in a row)", self.nonfinite_in_row)
                if self.nonfinite_in_row >= self.max_nonfinite:
                    raise RuntimeError(
                        f"{self.nonfinite_in_row} non-finite steps in a row: training diverged "
                        f"(lower the learning rate or raise trainer grad clipping)"
                    )
            opt.zero_grad(set_to_none=True)
        logs["nonfinite_steps"] = torch.tensor(float(self.nonfinite_total))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch.n_edits, prog_bar=False)
        self.log("train_loss", logs["loss"], prog_bar=True, logger=False, batch_size=batch.n_edits)

    def _log_editor_state(self, batch_size: int) -> None:
        """The editor's own state after an update (Editor.state_to_log), as `train/state/<name>`."""
        state = self.editor.state_to_log()
        if state:
            # Copied: a buffer the editor updates in place later (KE's λ) must not change a logged value.
            values = {f"train/state/{k}": v.detach().float().clone() if torch.is_tensor(v) else float(v)
                      for k, v in state.items()}
            self.log_dict(values, batch_size=batch_size, prog_bar=False)

    def on_validation_epoch_start(self) -> None:
        self._val = MetricAccumulator()

    def validation_step(self, batch: EditBatch, batch_idx: int) -> None:
        self._val.add(evaluate_edit_batch(self.editor, batch))

    def on_validation_epoch_end(self) -> None:
        s = self._val.summary()
        if not s:
            return
        # The shared selection criterion for every method (early stopping, best editor): the weighted
        # sum of the two outer losses, not a method's training objective (which may carry state).
        loss = self.c_edit * s["loss_edit"] + self.c_loc * s["loss_loc"]
        values = {f"val/{k}": s[k] for k in ("edit_acc", "rephrase_acc", "loc_retain", "drawdown", "edit_ms")}
        # CounterFact's probability comparisons, where the val records carry true objects.
        values.update({f"val/{k}": s[k] for k in ("es", "ps", "ns") if k in s})
        values.update({"val/loss_edit": s["loss_edit"], "val/loss_loc": s["loss_loc"], "val/loss": loss})
        for k, v in values.items():
            self.log(k, torch.tensor(v, device=self.device), sync_dist=True, prog_bar=k in ("val/loss", "val/rephrase_acc"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("base.")}
        checkpoint["nonfinite_total"] = self.nonfinite_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(checkpoint.get("nonfinite_total", 0))
