"""How SERAC's routing threshold τ trades in-scope recall against out-of-scope false positives, for
a trained editor on a split's records (one edit in memory per record, as evaluate.py runs it).

    python scripts/serac_threshold.py --editor checkpoints/serac-tiny-gpt2-synthetic \
        --records data/synthetic-s0-n200-v2/val.json

In-scope = the edit prompt and its rephrases (recall: routed to the counterfactual model); out-of-
scope = the record's locality inputs (false positive: routed there too). Choose τ on **val**, set it
with `method.editor.threshold=...` (configs/tuning/), and report test.
"""

from __future__ import annotations

import argparse

import torch

from metaedit.data.records import load_records
from metaedit.editors.io import load_editor
from metaedit.types import EditRequest

TAUS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", required=True)
    ap.add_argument("--records", required=True, help="a split file in the internal record format")
    args = ap.parse_args()
    editor = load_editor(args.editor)
    editor.eval()
    in_scope, out_scope = [], []
    with torch.no_grad():
        for rec in load_records(args.records):
            edited = editor.edit([EditRequest(rec["prompt"], rec["target_new"])])
            texts = [rec["prompt"], *rec["rephrases"], *(item["prompt"] for item in rec["locality"])]
            best = torch.sigmoid(edited.scope_logits(texts)).max(-1).values
            n_in = 1 + len(rec["rephrases"])
            in_scope.append(best[:n_in])
            out_scope.append(best[n_in:])
    pos, neg = torch.cat(in_scope), torch.cat(out_scope)
    print(f"{args.records}: {len(pos)} in-scope, {len(neg)} out-of-scope inputs")
    print("| τ | in-scope recall | out-of-scope false positives |\n|---|---|---|")
    for tau in TAUS:
        print(f"| {tau} | {float((pos > tau).float().mean()):.4f} | {float((neg > tau).float().mean()):.4f} |")


if __name__ == "__main__":
    main()
