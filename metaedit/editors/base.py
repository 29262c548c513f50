"""The one small interface every editor implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from metaedit.data.formatting import Formatter
from metaedit.editors.checkpoint import save_editor
from metaedit.functional import EditedModel, forward_logits, swapped_params
from metaedit.models.inner_params import InnerParam
from metaedit.paths import default_cache_dir
from metaedit.types import EditBatch, EditRequest, LMBatch, MetaEditError, SequenceState


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    if size < 1:
        raise MetaEditError(f"a sequence of edits needs a batch size >= 1, got {size}")
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Editor(nn.Module, ABC):
    """Turns (base model, edit requests) into an edited model, functionally.

    Subclasses implement `apply_edits` (differentiable w.r.t. the editor's own parameters, for
    meta-training) and `hparams` (the JSON-able constructor arguments saved with a checkpoint).
    The base model is referenced, not registered as a submodule, so `state_dict()` — and so every
    checkpoint — holds only the editor's own tensors.
    """

    method: ClassVar[str]
    # Attention implementation the method needs from the base model (e.g. "eager" where meta-training
    # differentiates through a backward pass); the loading code selects it unless the model config
    # names one explicitly. None: whatever the model config says.
    attn_implementation: ClassVar[str | None] = None
    # Constructor arguments that default to a value of the model config when the method config
    # leaves them unset: hparam -> dotted key in the model config (e.g. the layers a
    # locate-then-edit method edits, which depend on the model). Filled in by build_editor.
    hparams_from_model: ClassVar[dict[str, str]] = {}
    # Whether a long sequence of this editor's edits can be saved part-way and resumed
    # (`edit_sequential(resume=...)`, `sequence_state`); an editor whose sequence is no chain of
    # parameter updates (SERAC's memory appends) says no.
    resumable_sequences: ClassVar[bool] = True
    # True inside `editing_from`: the next edit is a step of a sequence, on a model already edited
    # (AlphaEdit and MALMEN's keep_earlier then use the keys of the sequence's earlier steps).
    _in_sequence: bool = False

    def __init__(self, model: PreTrainedModel, inner_params: Sequence[InnerParam]) -> None:
        super().__init__()
        if not inner_params:
            raise MetaEditError(f"{type(self).__name__}: no inner params to edit")
        object.__setattr__(self, "model", model)
        self.inner_params = list(inner_params)
        # Set by load_editor / the trainer; needed only for text-level `edit(requests)`.
        self.formatter: Formatter | None = None
        # Where an editor may cache what it derives from the base model (locate-then-edit key
        # statistics); set by build_editor / load_editor from configs/paths. None: the default cache.
        self.cache_dir: str | None = None

    @property
    def cache_root(self) -> Path:
        """`cache_dir`, or the default cache when it is unset."""
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    # ---- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def apply_edits(self, edit: LMBatch, requests: Sequence[EditRequest]) -> EditedModel:
        """Return the model edited for this batch of requests (all applied together)."""

    @abstractmethod
    def hparams(self) -> dict[str, Any]:
        """JSON-able constructor arguments (besides model and inner params)."""

    # ---- optional hooks for the outer loop ------------------------------------------------------
    def base_logits(self, batch: LMBatch) -> Tensor:
        """Logits of the *unedited* model that locality is measured against."""
        with torch.no_grad():
            return forward_logits(self.model, batch)

    def extra_losses(self, batch: EditBatch, edited: EditedModel) -> dict[str, Tensor]:
        """Method-specific terms added (already weighted) to the outer loss."""
        return {}

    def outer_objective(
        self, l_edit: Tensor, l_loc: Tensor, c_edit: float, c_loc: float, edit_success: Tensor | None = None
    ) -> Tensor:
        """The training loss from the two outer losses; `edit_success` (the batch's exact in-scope
        accuracy, no gradient) is there for objectives with a schedule that depends on it."""
        return c_edit * l_edit + c_loc * l_loc

    def training_loss_and_backward(
        self,
        batch: EditBatch,
        objective: Callable[..., tuple[Tensor, dict[str, Tensor]]],
        backward: Callable[..., None],
    ) -> dict[str, Tensor]:
        """One training step's outer loss and its backward pass; returns the logged terms (with "loss").

        `objective(batch, edited=None) -> (loss, logs)` is the trainer's outer loss; with `edited`
        None it applies this editor to `batch.edit`. `backward(loss, check=None)` back-propagates a
        scalar into this editor's parameters (scaled for gradient accumulation; skipped on every
        rank when `check`, default the loss itself, is not finite); call it exactly once. Default: one
        graph from the editor's parameters through the edited model to the loss. An editor that
        gets its gradient another way (MALMEN splits the graph at the weight shift) overrides this;
        the objective's terms then must depend on the editor only through `edited`.
        """
        with self.training_step_scope(batch):
            loss, logs = objective(batch)
            backward(loss)
        return logs

    def training_step_scope(self, batch: EditBatch) -> AbstractContextManager[None]:
        """What holds while one training step's outer loss on `batch` is computed and back-propagated
        (default: nothing). ENN and KE keep the prompts the step scores out of their preserved facts."""
        return nullcontext()

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (the trainer's `lr` is the default); an editor whose parts
        need different step sizes (SERAC's pretrained counterfactual model) overrides this."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def prepare(self) -> None:
        """Do the one-off work an editor needs before its first edit (ROME's key statistics), so
        that `python train.py method=<untrained editor>` pays it up front, with progress, instead of
        the first edit. Default: nothing."""

    def one_off_costs(self) -> dict[str, float]:
        """What this editor paid once per base model outside any edit (e.g. ROME's key statistics),
        by metric name (minutes as `*_min`); evaluation reports it beside edit_ms. Default: none."""
        return {}

    def tensors_new_to(self, saved: Editor) -> set[str]:
        """State-dict keys of tensors this editor may start without when it starts from `saved`, an
        editor of the same method (`train.py init_from=`): tensors a wider setting of this run adds
        (ENN's extra meta-trained base parameters), which keep their initial values. Default: none,
        so any missing tensor is an error."""
        return set()

    def state_to_log(self) -> dict[str, Tensor | float]:
        """Scalars of the editor's own training state worth watching (learned step sizes, a Lagrange
        multiplier), by name; the trainer logs each after every optimizer step as
        `train/state/<name>`. Names without a "/" are summaries the progress lines also print; a
        name with one (e.g. "step_size/<param>") is a detail that only goes to the logger. Tensors
        are fine (no host sync here: the trainer detaches and copies them). Default: none."""
        return {}

    # ---- user-facing ----------------------------------------------------------------------------
    def edit(self, requests: Iterable[EditRequest | Mapping[str, Any] | Sequence[str]]) -> EditedModel:
        """Apply a list of edit requests (prompt, target) at once; the base model is left unchanged."""
        reqs = [EditRequest.coerce(r) for r in requests]
        if not reqs:
            raise MetaEditError("edit() needs at least one request")
        if self.formatter is None:
            raise MetaEditError("this editor has no tokenizer attached; load it with metaedit.load_editor")
        batch = self.formatter.batch([r.prompt for r in reqs], [r.target for r in reqs]).to(self.device)
        was_training = self.training
        self.eval()
        try:
            return self.apply_edits(batch, reqs).detached()
        finally:
            self.train(was_training)

    def edit_sequential(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any] | Sequence[str]],
        after_each: Callable[[int, EditedModel], None] | None = None,
        batch_size: int = 1,
        resume: SequenceState | None = None,
    ) -> EditedModel:
        """Apply requests `batch_size` at a time, each batch to the model as already edited by the
        previous ones (batch_size=1: one edit after another).

        Each step runs inside `editing_from(running edit)`, so the editor sees the edited weights
        while the caller's model stays unchanged. `after_each(k, edited)` is called after the k-th
        step (e.g. to evaluate, time or checkpoint it). State an editor accumulates over a sequence
        is reset first (`reset_sequence`). `resume` (a `SequenceState` saved after step
        `resume.steps - 1` of the same requests) skips the steps it holds and continues from its
        edited parameters and editor state, ending where the uninterrupted sequence ends.
        """
        self.reset_sequence()
        params: dict[str, Tensor] = {}
        start = 0
        if resume is not None:
            self.load_sequence_state(resume.editor_state)
            params, start = dict(resume.params), resume.steps
        for k, step_requests in enumerate(batched(requests, batch_size)):
            if k < start:
                continue
            with self.editing_from(params):
                step = self.edit(step_requests)
            params.update(step.params)
            if after_each is not None:
                after_each(k, EditedModel(self.model, params))
        return EditedModel(self.model, params)

    def reset_sequence(self) -> None:
        """Forget what the editor accumulated over a sequence of edits (none by default; AlphaEdit
        keeps the keys of earlier edits so later ones leave them alone). `edit_sequential` calls
        it before its first edit; a caller driving `editing_from` by hand calls it at the start of
        each new sequence."""

    def sequence_state(self) -> dict[str, Tensor]:
        """What the editor has accumulated over the current sequence, as named tensors, so a long
        sequence can be saved part-way and resumed (`load_sequence_state`). Default: nothing."""
        return {}

    def load_sequence_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore what `sequence_state` returned (after `reset_sequence`)."""
        if state:
            raise MetaEditError(f"{self.method} keeps no sequence state, but a saved sequence holds {sorted(state)[:3]}")

    @contextmanager
    def editing_from(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Make the next edits start from the model as edited by `params` (name -> tensor).

        By default the edited tensors are swapped into the base (restored in `finally`). An editor
        whose edits start from its own copy of base parameters (ENN's θ) must swap that copy too,
        or each step of a sequence would start from the unedited copy and drop the earlier edits.
        """
        current = {n: nn.Parameter(v.detach(), requires_grad=False) for n, v in params.items()}
        was, self._in_sequence = self._in_sequence, True
        try:
            with swapped_params(self.model, current):
                yield
        finally:
            self._in_sequence = was

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, directory: str) -> None:
        save_editor(self, directory)
