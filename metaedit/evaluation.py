"""Evaluate an editor on a split: edits applied in groups, metrics per DESIGN §3."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from metaedit.data.datamodule import EditDataModule
from metaedit.data.records import digest, write_text_atomic
from metaedit.editors.base import Editor
from metaedit.metrics import MAX_ROWS, MetricAccumulator, evaluate_edit_batch
from metaedit.progress import Progress
from metaedit.protocols import Protocol, SequenceCheckpoint
from metaedit.types import EditBatch, MetaEditError

log = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS: the process's peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def evaluate_editor(
    editor: Editor, data: EditDataModule, split: str = "test", limit: int | None = None, fluency_tokens: int = 0,
    time_reference: bool = False, protocol: Protocol | None = None, max_rows: int = MAX_ROWS,
    save_sequences: str | Path | None = None, per_edit: str | Path | None = None,
) -> dict[str, Any]:
    """Exact-mode metrics (and token-mode beside them, labelled) over `split`; CounterFact scores when
    the records have true objects, fluency from `fluency_tokens`-token generations when > 0.

    `protocol` (DESIGN §3) says how the records' edits reach the model: the records are taken in
    groups of `protocol.n`, each group edited from the unedited model and scored on all its edits.
    Default: groups of the data's `eval_n_edits` applied together (single when 1). With
    `save_sequences` (a path prefix), each sequential group saves its running edit to
    `<prefix>.group<i>.safetensors` and a re-run resumes from it (`SequenceCheckpoint`).
    `per_edit` (a path) gets one JSON line per scored edit — its case, relation, prompt, targets and
    its own es / ps / ns / exact accuracies — to see which edits an editor fails.
    """
    protocol = protocol or Protocol.together(data.eval_n_edits)
    acc = MetricAccumulator()
    scored = data.records(split)[: limit or None]
    if len(scored) % protocol.n:
        log.warning("evaluate: %d records is not a multiple of n=%d; the last group has %d edits",
                    len(scored), protocol.n, len(scored) % protocol.n)
    by_relation: dict[str, MetricAccumulator] = {}
    editor.eval()
    # One-off work (key statistics, AlphaEdit's preserved facts) before the first timed edit: it is
    # reported apart (`one_off_costs`), not inside the first edit's edit_ms.
    editor.prepare()
    device = editor.device
    progress = Progress(len(scored), unit="rec", noun="records")
    edit_lines: list[str] = []
    for i, batch in enumerate(data.loader(split, limit=limit, shuffle=False, batch_size=protocol.n)):
        checkpoint = (SequenceCheckpoint(f"{save_sequences}.group{i}.safetensors")
                      if save_sequences is not None and protocol.name == "sequential" else None)
        outcome = evaluate_edit_batch(editor, batch.to(device), fluency_tokens, time_reference, protocol, max_rows,
                                      checkpoint)
        acc.add(outcome)
        # Group i is records i·n ... i·n+n-1 (the loader does not shuffle): each row of its outcome also
        # goes to the accumulator of the relation of the edit it belongs to.
        group = scored[i * protocol.n: (i + 1) * protocol.n]
        for relation, part in outcome_by_relation(outcome, batch, [r.get("relation") for r in group]).items():
            by_relation.setdefault(relation, MetricAccumulator()).add(part)
        if per_edit is not None:
            if "loc" not in row_owners(batch) and not edit_lines:
                log.warning("per_edit: the out-of-scope rows of a batch of %d edits belong to no one edit, so "
                            "the per-edit lines carry es and ps but no ns", batch.n_edits)
            edit_lines += [json.dumps({"index": i * protocol.n + k, "group": i, **_identity(record), **figures})
                           for k, (record, figures) in enumerate(zip(group, outcome_by_edit(outcome, batch)))]
        done = min((i + 1) * protocol.n, len(scored))
        if progress.due(done):  # a line per ~10% of the records
            log.info("evaluate: %s edit_acc so far %.3f", progress.line(done), acc.mean("edit_exact"))
    metrics = acc.summary()
    metrics["peak_mem_mb"] = peak_memory_mb(device)
    metrics.update(editor.one_off_costs())
    report: dict[str, Any] = {
        "records_digest": digest(scored),
        "method": editor.method,
        "model": getattr(editor, "model_cfg", {}).get("name"),
        "data": data.name,
        "split": split,
        "protocol": protocol.name,
        "n": protocol.n,
        "batch": protocol.batch,
        "edits_per_batch": protocol.step,
        "limit": limit,
        "fluency_tokens": fluency_tokens,
        "mode": "exact",
        "metrics": metrics,
        "token_mode": acc.token_summary(),
    }
    if len(by_relation) > 1:
        report["by_relation"] = {r: by_relation[r].summary() for r in sorted(by_relation)}
    if per_edit is not None:
        write_text_atomic(Path(per_edit), "".join(line + "\n" for line in edit_lines))
        report["per_edit"] = str(per_edit)
    return report


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """What names an edit in the per-edit lines."""
    return {k: record[k] for k in ("case_id", "relation", "subject", "prompt", "target_new", "target_true")
            if record.get(k) not in (None, "")}


# Which rows of a group's outcome each per-row key holds: the edits themselves, their rephrases
# (owner: `inscope_owner`) or the out-of-scope inputs (owner: `loc_owner`). Per-group values (edit_ms,
# losses, fluency, timings) belong to no one edit and stay out of the per-relation figures.
_ROWS_OF = {"edit_exact": "edit", "edit_token": "edit", "es": "edit",
            "rephrase_exact": "inscope", "rephrase_token": "inscope", "ps": "inscope",
            "loc_retain_exact": "loc", "loc_retain_token": "loc", "loc_pre_exact": "loc", "loc_post_exact": "loc",
            "ns": "loc"}


def row_owners(batch: EditBatch) -> dict[str, torch.Tensor]:
    """For each kind of row (`_ROWS_OF`'s values), the edit each row belongs to; no "loc" entry when
    the out-of-scope rows of a multi-edit batch have no owners."""
    owners = {"edit": torch.arange(batch.n_edits), "inscope": batch.inscope_owner.cpu()}
    if batch.loc_owner is not None:
        owners["loc"] = batch.loc_owner.cpu()
    elif batch.n_edits == 1:
        owners["loc"] = torch.zeros(len(batch.loc), dtype=torch.long)
    return owners


def outcome_by_edit(outcome: dict[str, torch.Tensor], batch: EditBatch) -> list[dict[str, float]]:
    """Each edit's own figures from a group's per-row outcome: the mean over its rows of every
    per-row key (es of the edit, ps over its rephrases, ns over its neighbours). Keys of rows that
    belong to no one edit (`row_owners`) are left out."""
    owners = row_owners(batch)
    per_edit: list[dict[str, float]] = [{} for _ in range(batch.n_edits)]
    for key, value in outcome.items():
        if key not in _ROWS_OF or _ROWS_OF[key] not in owners:
            continue
        owner, value = owners[_ROWS_OF[key]], value.reshape(-1).float()
        for k in range(batch.n_edits):
            mine = value[owner == k]
            if len(mine):
                per_edit[k][key] = float(mine.mean())
    return per_edit


def outcome_by_relation(outcome: dict[str, torch.Tensor], batch: EditBatch,
                        relations: list[str | None]) -> dict[str, dict[str, torch.Tensor]]:
    """A group's per-row outcome split by the relation of the edit each row belongs to (`relations[k]`:
    edit k's). Empty when a relation is unknown, or the out-of-scope rows have no owners."""
    if not relations or None in relations or len(relations) != batch.n_edits:
        return {}
    owners = row_owners(batch)
    if "loc" not in owners:
        return {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for relation in dict.fromkeys(relations):
        mine = torch.tensor([r == relation for r in relations])
        parts[str(relation)] = {key: value.reshape(-1)[mine[owners[_ROWS_OF[key]]]]
                                for key, value in outcome.items() if key in _ROWS_OF}
    return parts


def protocol_from(cfg: Any) -> Protocol:
    """The protocol an evaluate/bench config asks for. `n_edits=N` (the older knob: N edits applied
    together) is protocol=batch n=N."""
    name, n, batch = str(cfg.get("protocol") or "single"), int(cfg.get("n") or 1), int(cfg.get("batch") or 1)
    legacy = cfg.get("n_edits")
    if legacy is not None and int(legacy) != 1:
        if name == "sequential" or (name == "batch" and n not in (1, int(legacy))):
            raise MetaEditError(f"n_edits={legacy} means protocol=batch n={legacy}; it conflicts with "
                                f"protocol={name} n={n} (give only protocol/n/batch)")
        name, n = "batch", int(legacy)
    return Protocol(name, n=1 if name == "single" else n, batch=batch if name == "sequential" else 1)


def format_report(report: dict[str, Any]) -> str:
    m, t = report["metrics"], report["token_mode"]
    lines = [
        f"{report['method']} on {report['model']} / {report['data']}:{report['split']} "
        f"({int(m['n_edits'])} edits, {Protocol(report['protocol'], report['n'], report['batch']).describe()})",
        f"  exact mode: edit_acc {m['edit_acc']:.3f}  rephrase_acc {m['rephrase_acc']:.3f}  "
        f"loc_retain {m['loc_retain']:.3f}  drawdown {m['drawdown']:.4f}",
        f"  token mode: edit_acc {t['edit_acc']:.3f}  rephrase_acc {t['rephrase_acc']:.3f}  loc_retain {t['loc_retain']:.3f}",
        f"  edit_ms {m['edit_ms']:.1f}  peak_mem_mb {m['peak_mem_mb']:.0f}",
    ]
    if "es" in m:
        lines.insert(3, f"  counterfact: es {m['es']:.3f}  ps {m['ps']:.3f}  ns {m['ns']:.3f}  score {m['score']:.3f}"
                        + (f"  fluency {m['fluency']:.3f}" if "fluency" in m else ""))
    for relation, r in report.get("by_relation", {}).items():
        scores = f"  es {r['es']:.3f} ps {r['ps']:.3f} ns {r['ns']:.3f}" if "es" in r else ""
        lines.append(f"    {relation:<14} {int(r['n_edits']):>4} edits  edit {r['edit_acc']:.3f} rephrase "
                     f"{r['rephrase_acc']:.3f} loc {r['loc_retain']:.3f}{scores}")
    return "\n".join(lines)


def plain_dict(node: Any) -> dict[str, Any]:
    """A config node, mapping or None as a plain dict with string keys."""
    from omegaconf import DictConfig, OmegaConf

    if not node:
        return {}
    out = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


def editor_overrides(cfg: Any) -> dict[str, Any]:
    """The `hparams` node of an evaluate.py / edit.py config: saved editor hyper-parameters to override."""
    return plain_dict(cfg.get("hparams"))


def run_evaluation(cfg: Any) -> dict[str, Any]:
    """What `python evaluate.py` does: load the editor, evaluate a split, print and write JSON."""
    from hydra.utils import instantiate

    from metaedit.editors.io import editor_digest, load_editor, resolve_editor_dir

    editor_dir = resolve_editor_dir(cfg.editor)
    override = editor_overrides(cfg)
    editor = load_editor(editor_dir, force=cfg.force, device=cfg.device, cache_dir=cfg.paths.cache_dir, hparams=override)
    protocol = protocol_from(cfg)
    data = instantiate(cfg.data, formatter=editor.formatter, eval_n_edits=protocol.n, _recursive_=False)
    out = Path(cfg.output) if cfg.output else editor_dir / f"eval-{data.name}-{cfg.split}.json"
    report = evaluate_editor(editor, data, split=cfg.split, limit=cfg.limit, fluency_tokens=cfg.fluency_tokens,
                             time_reference=cfg.time_reference, protocol=protocol,
                             max_rows=int(cfg.get("max_rows") or MAX_ROWS),
                             save_sequences=out.with_suffix(".sequence") if cfg.get("resume", True) else None,
                             per_edit=cfg.get("per_edit"))
    report["editor_dir"], report["editor_digest"] = str(editor_dir), editor_digest(editor_dir)
    if override:
        report["hparams_override"] = override
    write_text_atomic(out, json.dumps(report, indent=1))
    print(format_report(report), flush=True)
    print(f"metrics written to {out}", flush=True)
    return report
