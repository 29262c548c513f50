"""MEND edit time vs one plain forward+backward of the base model on the same edit batch.

    python scripts/bench_edit_speed.py [--models tiny-gpt2 tiny-llama tiny-t5] [--editor-dir DIR] [--repeats 30]

Both are timed in the same process, interleaved (A B A B ...), and the ratio of medians is
reported, so machine-speed drift affects both sides equally. Writes results/bench-edit-speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metaedit.data.synthetic import build_world
from metaedit.editors.io import build_editor, load_editor
from metaedit.functional import forward_logits
from metaedit.losses import nll
from metaedit.models.loading import load_base_model, load_model_config


def edit_requests(n: int) -> list[tuple[str, str]]:
    world = build_world(seed=0, n_subjects=200)
    subjects = [s for s in world.subjects if world.split_of[s] == "test"][:n]
    return [(f"The capital of {s} is", next(o for o in world.objects["capital"] if o != world.facts[(s, "capital")]))
            for s in subjects]


def plain_forward_backward(model, batch) -> None:
    """What fine-tuning costs per step: forward, loss, backward into every base parameter."""
    model.zero_grad(set_to_none=True)
    nll(forward_logits(model, batch), batch.targets).backward()


def bench(model_name: str, n_edits: int, repeats: int, editor_dir: str | None) -> dict:
    cfg = load_model_config(model_name)
    model, tok = load_base_model(cfg)
    trained = Path(editor_dir or f"checkpoints/mend-{model_name}-synthetic")
    if (trained / "best").is_dir() or (trained / "editor_config.json").is_file():
        editor, source = load_editor(trained, model=model, tokenizer=tok), str(trained)
    else:  # no trained editor yet: a fresh MEND has the same cost structure
        editor, source = build_editor("mend", model, cfg, {}, tokenizer=tok), "fresh (untrained)"
    editor.eval()
    batch = editor.formatter.batch(*zip(*edit_requests(n_edits)))
    params = list(model.parameters())
    times: dict[str, list[float]] = {"edit": [], "fwd_bwd": []}
    for i in range(repeats + 3):
        for kind in ("edit", "fwd_bwd"):
            if kind == "fwd_bwd":
                for p in params:
                    p.requires_grad_(True)
            t0 = time.perf_counter()
            if kind == "edit":
                with torch.no_grad():
                    editor.apply_edits(batch, [])
            else:
                plain_forward_backward(model, batch)
            dt = (time.perf_counter() - t0) * 1000
            if kind == "fwd_bwd":
                model.zero_grad(set_to_none=True)
                for p in params:
                    p.requires_grad_(False)
            if i >= 3:  # warm-up
                times[kind].append(dt)
    e, f = statistics.median(times["edit"]), statistics.median(times["fwd_bwd"])
    return {"model": model_name, "n_edits": n_edits, "editor": source, "edit_ms": round(e, 2), "fwd_bwd_ms": round(f, 2),
            "ratio": round(e / f, 3), "repeats": repeats, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-llama", "tiny-t5"])
    ap.add_argument("--n-edits", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--editor-dir", default=None,
                    help="a trained editor (default: checkpoints/mend-<model>-synthetic, else a fresh MEND)")
    ap.add_argument("--out", default="results/bench-edit-speed.json")
    args = ap.parse_args()
    rows = [bench(m, n, args.repeats, args.editor_dir) for m in args.models for n in args.n_edits]
    for r in rows:
        print(f"{r['model']:<11} edits={r['n_edits']}  MEND edit {r['edit_ms']:7.2f} ms   "
              f"forward+backward {r['fwd_bwd_ms']:7.2f} ms   ratio {r['ratio']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python scripts/bench_edit_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
