"""Markdown table of test metrics JSONs: python scripts/results_table.py [results/synthetic]"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/synthetic")
    rows = []
    for path in sorted(root.glob("*.json")):
        r = json.loads(path.read_text())
        m = r["metrics"]
        train_s = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") and r["method"] not in ("ft", "ftl") else "—"
        rows.append((r["model"], r["method"], m, int(m["n_edits"]), train_s))
    print("| model | method | edit_acc | rephrase_acc | loc_retain | drawdown | edit_ms | test edits | train wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, method, m, n, t in sorted(rows, key=lambda x: (x[0], x[1])):
        print(f"| {model} | {method} | {m['edit_acc']:.3f} | {m['rephrase_acc']:.3f} | {m['loc_retain']:.3f} | "
              f"{m['drawdown']:.3f} | {m['edit_ms']:.1f} | {n} | {t} |")


if __name__ == "__main__":
    main()
