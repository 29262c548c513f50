"""Per-method cost on the tiny models, every registered method in one run: training step time, edit
time and peak memory.

    python scripts/bench_methods.py [--models tiny-gpt2 tiny-t5] [--checkpoints checkpoints] [--repeats 10]

Which methods: every name in the registry (`EDITORS`), so a method added later is benchmarked
without changing this script. A method is measured with its trained editor from
`<checkpoints>/<method>-<model>-synthetic/` when there is one; a method with nothing to train (FT,
FT-L) is built from its `configs/method/<method>.yaml`; a learned method without a checkpoint is
listed as skipped, or, with --fresh-missing,
measured as a freshly built editor (same networks, same cost) and labelled "(untrained)". A
checkpoint trained for another build of the base (fingerprint mismatch) counts as missing.

Measured, per (method, model), each in a fresh child process (so one method's memory never counts
for another):
- `train_step_ms`: one outer step of EditorSystem's objective (edit, L_edit, L_loc, the editor's
  extra terms) plus its backward, on one fixed training batch (4 edits, 2 rephrases and 4 locality
  inputs each); median of `repeats` after 2 warm-up steps. Gradients are not applied, so every
  repeat sees the same editor.
- `edit_ms`: `apply_edits` for one edit request (no_grad, eval mode), median of `repeats`.
- `edit_peak_mb` / `train_peak_mb`: peak resident memory (Linux `ru_maxrss`) reached while editing /
  while training, minus the resident memory (`/proc/self/statm`) before the first measured call,
  i.e. after the base model, editor and batch are loaded. CPU memory: tracemalloc does not see
  torch's allocations, RSS does. Measured edit first, then training (ru_maxrss never decreases).
Writes results/bench-methods.json and a markdown table (printed and results/bench-methods.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(repeats + warmup):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(method: str, model_name: str, checkpoints: Path, repeats: int, data_dir: str,
            fresh_missing: bool = False) -> dict:
    """One (method, model) in this process: load, then edit, then train-step measurements."""
    from metaedit.data.datamodule import SyntheticEditData
    from metaedit.editors.io import build_editor, load_editor, model_config_for
    from metaedit.models.loading import load_base_model, load_model_config
    from metaedit.system import EditorSystem
    from metaedit.types import MetaEditError

    run = checkpoints / f"{method}-{model_name}-synthetic"
    editor, missing = None, f"no trained editor in {run}"
    if (run / "best").is_dir() or (run / "editor_config.json").is_file():
        try:
            editor, source = load_editor(run), str(run)
        except MetaEditError as e:  # e.g. trained for another build of the base (fingerprint)
            missing = f"unusable editor in {run}: {e}"
    if editor is None:
        method_cfg = yaml.safe_load((ROOT / "configs" / "method" / f"{method}.yaml").read_text())
        model_cfg = model_config_for(method, load_model_config(model_name))
        model, tok = load_base_model(model_cfg)
        editor = build_editor(method, model, model_cfg, method_cfg.get("editor") or {}, tokenizer=tok)
        source = f"configs/method/{method}.yaml"
        if editor.trainable():
            if not fresh_missing:
                return {"method": method, "model": model_name, "skipped": missing}
            # Same networks and shapes as a trained editor, so the same cost; labelled in the table.
            source = f"fresh, untrained ({missing})"
    world = {"seed": 0, "n_subjects": 200}
    data = SyntheticEditData(world=world, name="synthetic", data_dir=data_dir, formatter=editor.formatter,
                             n_edits=4, rephrases_per_edit=2, loc_per_edit=4, seed=0)
    train_batch = next(iter(data.loader("train")))
    edit_batch = next(iter(data.loader("test", limit=1)))
    base_mb = rss_mb()

    editor.eval()

    def edit() -> None:
        with torch.no_grad():
            editor.apply_edits(edit_batch.edit, edit_batch.requests)

    edit_ms = median_ms(edit, repeats)
    edit_peak = peak_rss_mb() - base_mb
    row = {"method": method, "model": model_name, "editor": source, "edit_ms": round(edit_ms, 2),
           "edit_peak_mb": round(edit_peak, 1), "train_step_ms": None, "train_peak_mb": None}
    if editor.trainable():
        system = EditorSystem(editor)
        editor.train()
        editor.model.eval()  # as in training: the base stays in eval mode

        def step() -> None:
            loss, _ = system._objective(train_batch)
            loss.backward()
            editor.zero_grad(set_to_none=True)

        row["train_step_ms"] = round(median_ms(step, repeats), 2)
        row["train_peak_mb"] = round(peak_rss_mb() - base_mb, 1)
    row.update(repeats=repeats, threads=torch.get_num_threads(), train_batch_edits=train_batch.n_edits,
               edit_batch_edits=edit_batch.n_edits)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | method | train step (ms) | edit_ms | peak memory, train step (MB) | peak memory, edit (MB) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"])):
        if "skipped" in r:
            continue
        def fmt(v):
            return "—" if v is None else f"{v:.1f}"
        method = r["method"] + (" (untrained)" if r["editor"].startswith("fresh") else "")
        lines.append(f"| {r['model']} | {method} | {fmt(r['train_step_ms'])} | {fmt(r['edit_ms'])} | "
                     f"{fmt(r['train_peak_mb'])} | {fmt(r['edit_peak_mb'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-t5"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--data-dir", default="data/synthetic-s0-n200")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    ap.add_argument("--fresh-missing", action="store_true",
                    help="measure a learned method without a usable trained editor as a fresh (untrained) one")
    ap.add_argument("--out", default="results/bench-methods.json")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child process: measure one pair, print its JSON row
        row = measure(args.one[0], args.one[1], Path(args.checkpoints), args.repeats, args.data_dir, args.fresh_missing)
        print("ROW " + json.dumps(row))
        return

    from metaedit.editors.registry import EDITORS

    methods = args.methods or sorted(EDITORS)
    rows = []
    for model_name in args.models:
        for method in methods:
            cmd = [sys.executable, __file__, "--one", method, model_name, "--checkpoints", args.checkpoints,
                   "--data-dir", args.data_dir, "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.fresh_missing:
                cmd += ["--fresh-missing"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            found = [ln[4:] for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
            if res.returncode != 0 or not found:
                row = {"method": method, "model": model_name, "skipped": f"failed: {res.stderr.strip()[-500:]}"}
            else:
                row = json.loads(found[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    md = table(rows)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_methods.py " + " ".join(sys.argv[1:])
    out.write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
