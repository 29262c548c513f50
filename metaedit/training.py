"""`train(cfg)`: everything `python train.py` does, testable without a subprocess."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping

from metaedit.callbacks import AtomicModelCheckpoint, ProgressLog, SaveBestEditor, TimeBudget
from metaedit.editors.base import Editor
from metaedit.editors.io import build_editor, load_editor, model_config_for, save_editor
from metaedit.evaluation import evaluate_editor, format_report
from metaedit.models.loading import load_base_model
from metaedit.precision import resolve_precision
from metaedit.system import EditorSystem
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)

# Lightning warnings about choices made on purpose: the base model stays in eval mode, optimisation is
# manual (to skip non-finite steps), and batches are moved by EditBatch.to.
for _message in ("Found .* module\\(s\\) in eval mode", "Using ModelCheckpoint with manual optimization",
                 "You have overridden `transfer_batch_to_device`", "Checkpoint directory .* exists and is not empty"):
    warnings.filterwarnings("ignore", message=_message)


class WeightsOnlyCheckpointIO(TorchCheckpointIO):
    """Loads every Lightning checkpoint with torch.load(weights_only=True): resuming never unpickles.

    `trainer.fit(weights_only=True)` alone does not guarantee it: Lightning 2.6 drops the argument
    for strategies that restore after setup (FSDP, DeepSpeed, ModelParallel; Trainer._run), and
    torch.load's own default then applies, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off. Our
    checkpoints hold only tensors and plain state, so nothing in them needs unpickling.
    """

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if map_location is None:  # keep the parent's default (tensors stay where they were saved)
            return super().load_checkpoint(path, weights_only=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# What a run's weights depend on: resuming its last.ckpt under other values of these would continue
# one editor while the run's config names another. (trainer.max_steps, budgets, logging may change:
# continuing with a larger max_steps is what resuming is for.)
IDENTITY_SECTIONS = ("method", "model", "data", "seed")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _refuse_resuming_other_settings(run_dir: Path, cfg: DictConfig) -> None:
    """Raise if `run_dir`'s last.ckpt was trained under other method / model / data / seed settings
    than `cfg` (compared with the train_config.yaml the run wrote; runs older than it pass)."""
    saved_file = run_dir / "train_config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_file))
    now = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(saved, dict) and isinstance(now, dict)
    old = _flat({k: saved.get(k) for k in IDENTITY_SECTIONS})
    new = _flat({k: now.get(k) for k in IDENTITY_SECTIONS})
    # A setting the saved config lacks was added to the project after that run; at an "off" value
    # (False, 0, None, empty: how new options default to the earlier behaviour) it changes nothing.
    added_off = {k for k in new.keys() - old.keys() if new[k] in (False, 0, None, [], {})}
    changed = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and k not in added_off]
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise MetaEditError(
            f"{run_dir / 'last.ckpt'} was trained with other settings than this run's ({shown}); resuming it would "
            f"continue that editor under this config. Use another run_name, or resume=false to train from scratch "
            f"(overwrites {run_dir})")


def init_from_saved(editor: Editor, path: str | Path, model: Any, tokenizer: Any, cache_dir: str | None) -> None:
    """Start `editor` from a saved editor's tensors (`train.py init_from=checkpoints/<run>/best`), e.g. to
    continue a trained editor under another objective (lifelong training from a plain MALMEN) without
    paying for the steps it already took. The saved editor must be of the same method, for the same
    base model and inner params, with tensors of the same shapes; its other settings (step sizes'
    initial value, loss weights) are this run's. The optimizer starts fresh."""
    saved = load_editor(path, model=model, tokenizer=tokenizer, cache_dir=cache_dir)
    # A subclass's editor may start from its parent's (MALMEN from a trained MEND: the same networks
    # and step sizes; its own tensors, the regularisers λ, keep their initial values).
    extends = saved.method != editor.method and isinstance(editor, type(saved))
    if saved.method != editor.method and not extends:
        raise MetaEditError(f"init_from={path}: a {saved.method} editor cannot start a {editor.method} run")
    names, saved_names = [p.name for p in editor.inner_params], [p.name for p in saved.inner_params]
    if names != saved_names:
        raise MetaEditError(f"init_from={path}: it edits {saved_names[:3]}... ({len(saved_names)} params) but this run "
                            f"edits {names[:3]}... ({len(names)}); set model.inner_params as it was trained")
    own = set(editor.state_dict()) - set(saved.state_dict()) if extends else editor.tensors_new_to(saved)
    try:
        missing, unexpected = editor.load_state_dict(saved.state_dict(), strict=not own)
    except RuntimeError as e:
        raise MetaEditError(f"init_from={path}: its tensors do not fit this run's {editor.method} editor "
                            f"(a changed shape setting, e.g. rank?): {str(e).splitlines()[-1].strip()}") from None
    if unexpected or not set(missing) <= own:  # strict=False may only leave the editor's new tensors out
        raise MetaEditError(f"init_from={path}: its tensors do not fit this run's {editor.method} editor "
                            f"(missing {sorted(set(missing) - own)}, unexpected {sorted(unexpected)})")
    log.info("init_from %s: %d editor tensors loaded (optimizer fresh)%s", path, len(saved.state_dict()),
             f"; {sorted(own)} at their initial values" if own else "")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Meta-train the configured editor; return the test report (or {} when evaluation is off)."""
    t_start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    model_cfg = model_config_for(cfg.method.name, _plain(cfg.model))
    model, tokenizer = load_base_model(model_cfg, cfg.paths.cache_dir)
    editor = build_editor(cfg.method.name, model, model_cfg, _plain(cfg.method.editor) or {}, tokenizer=tokenizer,
                          cache_dir=cfg.paths.cache_dir)
    data = instantiate(cfg.data, formatter=editor.formatter, _recursive_=False)
    # Built now, before anything reads it: an editor's key statistics or preserved facts may name the
    # built directory (its train.json) and are read in editor.prepare() or the precision probe's step.
    data.prepare_data()
    run_dir = Path(cfg.paths.checkpoint_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = bool(cfg.resume and editor.trainable() and (run_dir / "last.ckpt").is_file())
    if resuming:
        _refuse_resuming_other_settings(run_dir, cfg)
    if cfg.get("init_from"):
        if resuming:
            log.info("init_from %s not used: the run resumes from its own last.ckpt", cfg.init_from)
        else:
            init_from_saved(editor, cfg.init_from, model, tokenizer, cfg.paths.cache_dir)
    (run_dir / "train_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run %s: %d inner params, editor has %d trainable parameters", cfg.run_name,
             len(editor.inner_params), sum(p.numel() for p in editor.parameters() if p.requires_grad))

    is_rank_zero = True
    budget: TimeBudget | None = None
    resumed_after = 0.0  # training seconds of the earlier process(es) of a resumed run
    if editor.trainable():
        system = EditorSystem(editor, **_plain(cfg.method.loss), **_plain(cfg.method.optim), prefix_cache=cfg.prefix_cache)
        callbacks = [
            AtomicModelCheckpoint(dirpath=run_dir, filename="last", save_last=False, save_top_k=1,
                                  every_n_train_steps=cfg.checkpoint_every_n_steps, enable_version_counter=False),
            SaveBestEditor(run_dir),
            EarlyStopping(monitor="val/loss", patience=cfg.patience, mode="min"),
            ProgressLog(every_n_steps=cfg.progress_every_n_steps),
        ]
        logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
        # `auto` times a real step of this run (its editor, its first training batch) where the CPU's flags
        # allow bf16: they do not tell whether bf16 autocast pays off for this model and batch size.
        first: list[Any] = []  # the first training batch, made only if a step is timed

        def step() -> None:
            if not first:
                first.append(next(iter(data.loader("train", shuffle=False))))
            system.forward_backward(first[0])

        # One process only: ranks timing on their own could choose differently (DDP keeps the flag rule).
        one_process = str(cfg.trainer.get("devices", 1)) == "1"
        precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator", "auto"),
                                      step=step if one_process else None)
        extra: dict[str, Any] = {"precision": precision}
        if cfg.trainer.get("enable_progress_bar", True) and not sys.stdout.isatty():
            # A redrawn bar only garbles a log file or a pipe; ProgressLog's lines report progress there.
            extra["enable_progress_bar"] = False
        if cfg.get("time_budget_s"):
            # A safety stop only (training ends by max_steps): the whole command (base load,
            # training, final evaluation) fits the budget, so training gets what is left after
            # loading minus a reserve for the evaluation.
            left = max(30.0, cfg.time_budget_s - (time.perf_counter() - t_start) - cfg.eval_reserve_s)
            budget = TimeBudget(deadline=time.monotonic() + left)
            callbacks.append(budget)
            log.info("time budget (safety stop): training must end within %.0f s; it is planned to end at "
                     "step %d", left, cfg.trainer.max_steps)
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                          plugins=[WeightsOnlyCheckpointIO()], **extra)
        last = run_dir / "last.ckpt"
        ckpt = str(last) if cfg.resume and last.is_file() else None
        if ckpt:
            log.info("resuming from %s", ckpt)
            # Training time is the run's, not this process's: add what the earlier process(es) spent.
            earlier = run_dir / "train_info.json"
            if earlier.is_file():
                resumed_after = float(json.loads(earlier.read_text()).get("train_seconds", 0.0))
        editor.prepare()  # one-off work (e.g. MEND's key statistics) before the first step, with its own log lines
        # weights_only: resuming never unpickles (WeightsOnlyCheckpointIO enforces it on every strategy).
        trainer.fit(system, datamodule=data, ckpt_path=ckpt, weights_only=True)
        # The final state is a resume point too (e.g. to continue with a larger max_steps), so it keeps
        # the optimizer and loop state. (Saving's `weights_only` means "model weights only"; left
        # unset, Lightning logs "`weights_only` was not set, defaulting to `False`" — about saving,
        # not loading: loading is weights_only=True above.)
        keep_optimizer_state = True
        trainer.save_checkpoint(f"{last}.tmp", weights_only=not keep_optimizer_state)
        is_rank_zero = trainer.is_global_zero
        if is_rank_zero:
            os.replace(f"{last}.tmp", last)
        if is_rank_zero and not (run_dir / "best" / "val_metrics.json").exists():
            # No validation ran (e.g. max_steps below the val interval), in this process or in one
            # this run resumes: the final editor is the run's, not an earlier process's.
            save_editor(editor, run_dir / "best")
    else:
        log.info("method %s has nothing to train: its one-off preparation (if any), then its configuration",
                 cfg.method.name)
        editor.prepare()
        save_editor(editor, run_dir / "best")

    train_seconds = round(time.perf_counter() - t_start, 1)
    if is_rank_zero:
        info: dict[str, Any] = {"train_seconds": round(train_seconds + resumed_after, 1),
                                "steps": int(system.global_step) if editor.trainable() else 0}
        if resumed_after:
            info["resumed_after_seconds"] = resumed_after
        if editor.trainable():
            info["max_steps"] = int(cfg.trainer.max_steps)
            best_val = run_dir / "best" / "val_metrics.json"
            if best_val.is_file():
                info["selected_step"] = json.loads(best_val.read_text()).get("global_step")
            if budget is not None and budget.cut_at_step is not None:
                info["time_budget_cut_at_step"] = budget.cut_at_step
                log.warning("the time budget cut training short at step %d of %d", budget.cut_at_step, cfg.trainer.max_steps)
        (run_dir / "train_info.json").write_text(json.dumps(info))
        log.info("training: %s", info)
    if not (cfg.evaluate_after and is_rank_zero):
        return {}
    best = load_editor(run_dir, model=model, tokenizer=tokenizer, cache_dir=cfg.paths.cache_dir)
    report = evaluate_editor(best, data, split=cfg.eval_split, limit=cfg.get("eval_limit"), fluency_tokens=cfg.fluency_tokens)
    # Wall time of this process up to the end of training (model load/build included, evaluation not).
    report["train_seconds"] = train_seconds
    (run_dir / f"eval-{data.name}-{cfg.eval_split}.json").write_text(json.dumps(report, indent=1))
    print(format_report(report), flush=True)
    return report
