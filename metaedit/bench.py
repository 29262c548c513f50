"""What `python bench.py` does: every available editor on the same held-out edits of one model and
dataset, through the same evaluation code, each method in its own process (so `peak_mem_mb` is that
method's own peak). Writes <out>.json, <out>.md and <out>-*.png."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaedit.data.records import digest, write_json_atomic
from metaedit.editors.io import build_editor, editor_digest, save_editor
from metaedit.editors.registry import EDITORS
from metaedit.evaluation import plain_dict, protocol_from
from metaedit.models.loading import CONFIG_DIR, load_base_model, make_formatter
from metaedit.protocols import Protocol
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)
ROOT = CONFIG_DIR.parent
COLUMNS = ["es", "ps", "ns", "score", "edit_acc", "rephrase_acc", "loc_retain", "drawdown", "fluency", "edit_ms",
           "fwd_bwd_ms", "edit_over_fwd_bwd", "train_min", "stats_min", "peak_mem_mb", "n_edits"]


def _method_hparams(method: str, override: Any = None) -> dict[str, Any]:
    """The editor hyper-parameters of configs/method/<method>.yaml with a bench override merged in
    key by key: `+overrides.memit.stats.precision=fp32` changes that one statistics setting and keeps
    the file's other `stats` values."""
    base = yaml.safe_load((CONFIG_DIR / "method" / f"{method}.yaml").read_text()).get("editor") or {}
    merged = OmegaConf.to_container(OmegaConf.merge(base, override or {}), resolve=True)
    assert isinstance(merged, dict)
    return {str(k): v for k, v in merged.items()}


def _same_eval(report: dict[str, Any], cfg: DictConfig, records_digest: str, editor_dir: Path,
               override: dict[str, Any] | None = None) -> bool:
    """A saved evaluation is reusable only if it was made with this benchmark's settings (protocol
    included), on the same records, with the checkpoint that is there now and the same overrides of
    its saved hyper-parameters."""
    protocol = protocol_from(cfg)
    # Reports written before protocols existed were all single.
    made = (report.get("data"), report.get("split"), report.get("limit"), report.get("fluency_tokens"),
            report.get("protocol", "single"), report.get("n", 1), report.get("batch", 1),
            report.get("records_digest"), report.get("editor_digest"))
    now = (cfg.data.name, cfg.split, cfg.limit, cfg.fluency_tokens, protocol.name, protocol.n, protocol.batch,
           records_digest, editor_digest(editor_dir))
    return made == now and report.get("hparams_override", {}) == (override or {}) and "fwd_bwd_ms" in report["metrics"]


def protocol_tag(protocol: Protocol) -> str:
    """File-name suffix of a protocol ("" for single), so results of different protocols never
    overwrite (or get merged into) each other."""
    if protocol.name == "single":
        return ""
    return f"-batch{protocol.n}" if protocol.name == "batch" else f"-seq{protocol.n}x{protocol.batch}"


def _run(args: list[str], log_path: Path) -> None:
    """Run one of the project's entry points; its output goes to a log file named in any error.

    It runs in this process's working directory, so relative paths (data.path, paths.root_dir: ".")
    mean the same files in both."""
    # Hydra's argparse takes its options (--config-dir) only before the overrides.
    options = [a for a in args[1:] if a.startswith("--")]
    overrides = [a for a in args[1:] if not a.startswith("--")]
    with open(log_path, "w") as f:
        res = subprocess.run([sys.executable, str(ROOT / args[0]), *options, *overrides], stdout=f,
                             stderr=subprocess.STDOUT, env=os.environ.copy())
    if res.returncode != 0:
        raise MetaEditError(f"`{' '.join(args)}` failed (exit {res.returncode}); see {log_path}")


def _data_args(data: DictConfig, work: Path) -> list[str]:
    """Arguments that give train.py / evaluate.py exactly this benchmark's data settings (data.path,
    split fractions, seed, ...).

    The resolved `data` node is written as a config-group file and chosen with `data=from-bench`,
    not passed as `data.<key>=<value>` overrides: any value (a path with spaces or commas, a list, a
    dict) arrives as YAML, untouched by Hydra's override grammar; and a group choice is merged before
    the tuning files (configs/tuning/), which command-line overrides would clobber (a tuned
    data.n_edits for training, say). Resolved, the file also fixes seed and data_dir to this run's.
    """
    group = work / "configs" / "data"
    group.mkdir(parents=True, exist_ok=True)
    (group / "from-bench.yaml").write_text(OmegaConf.to_yaml(data, resolve=True))
    return [f"--config-dir={work / 'configs'}", "data=from-bench"]


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    protocol = protocol_from(cfg)
    tag = protocol_tag(protocol)
    out = Path(f"{cfg.out}{tag}")
    work = Path(cfg.paths.checkpoint_dir) / "bench" / f"{cfg.model.name}-{cfg.data.name}"
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_base_model(model_cfg, cfg.paths.cache_dir)
    data = instantiate(cfg.data, formatter=make_formatter(model, tokenizer, model_cfg), _recursive_=False)
    records = digest(data.records(cfg.split)[: cfg.limit or None])
    # evaluate.py takes the base model from the editor's own config; train.py needs it named.
    paths = [f"paths.root_dir={cfg.paths.root_dir}", f"paths.cache_dir={cfg.paths.cache_dir}"]
    common = [*_data_args(cfg.data, work), *paths]
    rows: list[dict[str, Any]] = []
    for name in cfg.methods:
        row: dict[str, Any] = {"method": name}
        # A variant is a method trained another way (e.g. with relations held out), under its own run name.
        variant = dict(cfg.variants.get(name) or {})
        method = variant.get("method") or ("ft" if name == "base" else name)
        run_name = variant.get("run_name") or f"{method}-{cfg.model.name}-{cfg.data.name}"
        if method not in EDITORS:
            rows.append({**row, "status": f"not available in this version (valid: {sorted(EDITORS)})"})
            continue
        hparams = _method_hparams(method, cfg.overrides.get(name))
        if variant:
            row["variant"] = {"method": method, "run_name": run_name, "train": list(variant.get("train", []))}
        if name == "base":
            hparams["steps"] = 0  # no edit: the pre-edit model through the same code
        editor = build_editor(method, model, model_cfg, hparams, tokenizer=tokenizer, cache_dir=cfg.paths.cache_dir)
        trained = editor.trainable()
        if not trained:
            editor_dir = work / name
            save_editor(editor, editor_dir)
            train_info: dict[str, Any] = {}
        else:
            editor_dir = Path(cfg.paths.checkpoint_dir) / run_name
            if not (editor_dir / "best").is_dir():
                if not cfg.train_missing:
                    rows.append({**row, "status": f"no trained checkpoint at {editor_dir} (train it, or train_missing=true)"})
                    continue
                log.info("training %s (log: %s)", method, work / f"{name}-train.log")
                # A variant may train on another dataset (`train_data`), with this benchmark's val/test
                # prompts and subjects kept out of it (data.keep_out), so it is still scored held out.
                data_args = common
                if variant.get("train_data"):
                    held = work / f"{cfg.data.name}-val-test"  # this benchmark's val/test records, as keep_out reads them
                    for split in ("val", "test"):
                        write_json_atomic(held / f"{split}.json", data.records(split))
                    data_args = [f"data={variant['train_data']}", f"data.keep_out=['{held}']", *paths]
                _run(["train.py", f"method={method}", f"model={cfg.model.name}", *data_args, f"run_name={run_name}",
                      *variant.get("train", []), "evaluate_after=false"], work / f"{name}-train.log")
            info = editor_dir / "train_info.json"
            train_info = json.loads(info.read_text()) if info.is_file() else {}
        del editor
        # A trained editor's bench override changes saved hyper-parameters at load time (evaluate.py hparams).
        override = {**plain_dict(variant.get("hparams")), **plain_dict(cfg.overrides.get(name))} if trained else {}
        result = work / f"{name}-eval{tag}.json"
        t0 = time.perf_counter()
        if cfg.reuse and result.is_file() and _same_eval(json.loads(result.read_text()), cfg, records, editor_dir, override):
            log.info("reusing %s (reuse=true)", result)
        else:
            # One log per protocol too: runs of two protocols may be going at once.
            eval_log = work / f"{name}-eval{tag}.log"
            log.info("evaluating %s on %s edits (log: %s)", name, cfg.limit, eval_log)
            _run(["evaluate.py", f"editor={editor_dir}", *common, f"split={cfg.split}", f"limit={cfg.limit}",
                  f"fluency_tokens={cfg.fluency_tokens}", "time_reference=true", f"protocol={protocol.name}",
                  f"n={protocol.n}", f"batch={protocol.batch}", f"output={result}",
                  *(f"+hparams.{k}={json.dumps(v)}" for k, v in override.items())],
                 eval_log)
        report = json.loads(result.read_text())
        m = report["metrics"]
        # The table columns, and every one-off cost the editor reported (`Editor.one_off_costs`:
        # stats_min, preserve_facts_min, ...) even where the table has no column for it.
        row.update({k: m[k] for k in m if k in COLUMNS or k.endswith("_min")})
        if "by_relation" in report:
            row["by_relation"] = {rel: {k: r[k] for k in ("n_edits", "es", "ps", "ns", "score") if k in r}
                                  for rel, r in report["by_relation"].items()}
        if train_info:
            row["train_min"] = round(train_info["train_seconds"] / 60, 1)
            row["train_steps"] = train_info.get("steps")
        row.update(status="ok", eval_seconds=round(time.perf_counter() - t0, 1), hparams=hparams,
                   measured=time.strftime("%Y-%m-%d %H:%M"))
        rows.append(row)
        log.info("%s: %s", name, {k: row.get(k) for k in ("es", "ps", "ns", "score", "edit_ms")})
    previous = out.with_suffix(".json")
    old = json.loads(previous.read_text()) if cfg.merge and previous.is_file() else None
    if old is not None and (old.get("protocol", "single"), old.get("n", 1), old.get("batch", 1)) != (
            protocol.name, protocol.n, protocol.batch):
        log.warning("not merging %s: it was made with another protocol", previous)
        old = None
    if old is not None:
        # Keep the rows of methods not run this time (e.g. re-running only a newly trained editor).
        ran = {r["method"] for r in rows}
        # Rows keep their place in the saved table; methods new to it follow, in the order run.
        order = [r["method"] for r in old["rows"]] + list(cfg.methods)
        by_name = {r["method"]: r for r in old["rows"] if r["method"] not in ran} | {r["method"]: r for r in rows}
        rows = [by_name[m] for m in dict.fromkeys(order) if m in by_name]
    result_doc = {
        "model": cfg.model.name, "data": cfg.data.name, "split": cfg.split, "limit": cfg.limit, "mode": "exact",
        "protocol": protocol.name, "n": protocol.n, "batch": protocol.batch,
        "fluency_tokens": cfg.fluency_tokens, "command": " ".join(["python bench.py", *sys.argv[1:]]), "rows": rows,
    }
    (out.with_suffix(".json")).write_text(json.dumps(result_doc, indent=1))
    (out.with_suffix(".md")).write_text(markdown_table(result_doc))
    plot(result_doc, out)
    scaling_plot(Path(cfg.out), cfg.model.name, cfg.data.name)
    print(markdown_table(result_doc), flush=True)
    return result_doc


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(doc: dict[str, Any]) -> str:
    protocol = Protocol(doc.get("protocol", "single"), doc.get("n", 1), doc.get("batch", 1))
    lines = [f"{doc['model']} / {doc['data']}:{doc['split']} — first {doc['limit']} edits, {protocol.describe()}, "
             f"accuracies in {doc['mode']} mode; made with `{doc['command']}`", "",
             "| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r.get('status')} |" + " |" * (len(COLUMNS) - 1))
            continue
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |")
    relations = sorted({rel for r in doc["rows"] for rel in r.get("by_relation", {})})
    if relations:
        # Which facts an editor handles: es / ps / ns per relation (the edit's relation).
        lines += ["", "es / ps / ns by relation:", "",
                  "| method | " + " | ".join(relations) + " |", "|---" * (len(relations) + 1) + "|"]
        for r in doc["rows"]:
            per = r.get("by_relation", {})
            cells = ["/".join(_fmt(per[rel].get(k)) for k in ("es", "ps", "ns")) if rel in per else "—" for rel in relations]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], out: Path) -> None:
    """One PNG per group of comparable metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("status") == "ok"]
    if not rows:
        return
    groups = {
        "scores": ["es", "ps", "ns", "score"],
        "accuracy": ["edit_acc", "rephrase_acc", "loc_retain"],
        "fluency": ["fluency"],
        "edit-ms": ["edit_ms", "fwd_bwd_ms"],
        "training-min": ["train_min"],
        "peak-mem-mb": ["peak_mem_mb"],
    }
    for tag, keys in groups.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows) * len(keys) / 2, 3.2))
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            xs = [i + j * width for i in range(len(rows))]
            ax.bar(xs, [float(r.get(k) or 0) for r in rows], width=width, label=k)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["method"] for r in rows])
        ax.set_title(f"{doc['model']} / {doc['data']} ({doc['limit']} test edits): {tag}", fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}-{tag}.png", dpi=110)
        plt.close(fig)


def scaling_points(docs: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float, float, int]]]:
    """(method, "batch" | "sequential, B per step") -> [(edits per group N, es, ns, records)] sorted by N,
    from benchmark documents of several protocols. A single-edit run is N = 1 of both kinds."""
    series: dict[tuple[str, str], dict[int, tuple[float, float, int]]] = {}
    single: dict[str, tuple[float, float, int]] = {}
    for doc in docs:
        protocol = doc.get("protocol", "single")
        kind = "batch" if protocol == "batch" else f"sequential, {doc.get('batch', 1)} per step"
        for r in doc["rows"]:
            if r.get("status") != "ok" or r.get("es") is None or r.get("ns") is None:
                continue
            point = (float(r["es"]), float(r["ns"]), int(doc["limit"]))
            if protocol == "single":
                single[r["method"]] = point
            else:
                series.setdefault((r["method"], kind), {})[int(doc.get("n", 1))] = point
    for (method, _), pts in series.items():
        if method in single:
            pts.setdefault(1, single[method])
    return {key: sorted((n, *v) for n, v in pts.items()) for key, pts in series.items()}


def scaling_plot(out: Path, model: str, data: str) -> Path | None:
    """<out>-scaling.png: es and ns against the number of edits applied together or in sequence, one
    line per (method, protocol), from every result document of this model and data next to `out`."""
    docs = []
    for path in sorted(out.parent.glob(f"{out.name}*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("model") == model and doc.get("data") == data and "rows" in doc:
            docs.append(doc)
    series = scaling_points(docs)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    methods = sorted({m for m, _ in series})
    # tab20 past ten methods: with tab10 the eleventh line took the first one's colour.
    cmap, n_colors = (plt.get_cmap("tab10"), 10) if len(methods) <= 10 else (plt.get_cmap("tab20"), 20)
    colors = {m: cmap(i % n_colors) for i, m in enumerate(methods)}
    for (method, kind), pts in sorted(series.items()):
        style = "-" if kind == "batch" else "--"
        for ax, j in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[j] for p in pts], style, marker="o", color=colors[method],
                    label=f"{method} ({kind})")
    for ax, name in zip(axes, ("es", "ns")):
        ax.set_xscale("log")
        ax.set_xlabel("edits applied (one batch: solid; a sequence: dashed)")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    limits = sorted({d["limit"] for d in docs})
    axes[0].set_title(f"{model} / {data}: efficacy", fontsize=9)
    axes[1].set_title(f"neighbourhood (records per point: {', '.join(map(str, limits))})", fontsize=9)
    # Beside the plots, not over them: with a dozen lines an inside legend hides the points.
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    target = Path(f"{out}-scaling.png")
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target
