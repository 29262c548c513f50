"""Many edits at once: rephrase_acc and loc_retain with N edits in memory (SERAC) or applied in one
batch (MEND), N = 1, 10, 100, 1000, on the synthetic world's test split (exact mode).

    python scripts/serac_many_edits.py --editors checkpoints/serac-tiny-gpt2-synthetic \
        checkpoints/mend-tiny-gpt2-synthetic [--sizes 1 10 100 1000]

Which edits: the world has 200 subjects × 4 relations, only 30 of them test subjects (120 test
edits), so N = 1000 cannot be test edits alone. Every test edit is evaluated once at every N: the
120 test edits are cut into chunks of min(N, 120), and each chunk is topped up to exactly N with
distractor edits about made-up subjects (new names from the world's own name generator, with
relations and targets from the world). Distractors never share a subject with any prompt that is
scored, so they cannot change a correct answer — they only make retrieval (SERAC) or the summed
update (MEND) harder — and no scored locality input is ever in scope of an edit in memory.
Edits drawn from the other splits instead would put the locality inputs (facts of train/val
subjects) in scope of some edit once N is large, so loc_retain would stop measuring locality.

loc_retain uses one fixed set at every N: the test records' locality inputs about facts that no
test edit touches (this drops the same-subject hard negatives, which are themselves edited when all
120 test edits are in memory at once), so the numbers at different N are comparable.
Writes results/serac-many-edits.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from metaedit.data.synthetic import TEMPLATES, _unique_words, build_world, edit_records
from metaedit.decoding import greedy_relabel
from metaedit.editors.io import load_editor
from metaedit.functional import forward_logits
from metaedit.losses import exact_correct
from metaedit.types import EditRequest

ROWS = 128  # rows per forward when scoring


def distractors(world, n: int, seed: int = 1234) -> list[EditRequest]:
    rng = random.Random(seed)
    taken = set(world.subjects) | {o for objs in world.objects.values() for o in objs}
    names = _unique_words(rng, (n + 3) // 4, (2, 3), taken)
    out = [EditRequest(TEMPLATES[r][0][0].format(s), rng.choice(world.objects[r])) for s in names for r in TEMPLATES]
    return out[:n]


def score(editor, edited, prompts: list[str], targets: list[str], relabel: bool) -> list[bool]:
    """Exact-mode correctness of the edited model; with `relabel`, against the base's own greedy answer."""
    out: list[bool] = []
    for i in range(0, len(prompts), ROWS):
        batch = editor.formatter.batch(prompts[i : i + ROWS], targets[i : i + ROWS])
        if relabel:
            batch = greedy_relabel(lambda b: forward_logits(editor.model, b), batch)
        with torch.no_grad():
            out += exact_correct(edited.logits(batch), batch.targets).tolist()
    return out


def run(editor_dir: str, sizes: list[int]) -> dict:
    editor = load_editor(editor_dir)
    world = build_world(seed=0, n_subjects=200)
    records = edit_records(world, "test", n_loc=4)
    tests = [EditRequest(r["prompt"], r["target_new"]) for r in records]
    edited_facts = {t.format(r["subject"]) for r in records for t in sum(TEMPLATES[r["relation"]], [])}
    extra = distractors(world, max(sizes))
    rows = []
    for n in sizes:
        chunk = min(n, len(tests))
        hits = {"edit": [], "rephrase": [], "loc": []}
        t0 = time.perf_counter()
        for start in range(0, len(tests), chunk):
            recs = records[start : start + chunk]
            reqs = tests[start : start + chunk]
            memory = reqs + extra[: n - len(reqs)]
            batch = editor.formatter.batch([r.prompt for r in memory], [r.target for r in memory])
            editor.eval()
            edited = editor.apply_edits(batch, memory)
            hits["edit"] += score(editor, edited, [r.prompt for r in reqs], [r.target for r in reqs], False)
            rp = [(p, r["target_new"]) for r in recs for p in r["rephrases"]]
            hits["rephrase"] += score(editor, edited, [p for p, _ in rp], [t for _, t in rp], False)
            loc = [(x["prompt"], x["answer"]) for r in recs for x in r["locality"] if x["prompt"] not in edited_facts]
            if loc:
                hits["loc"] += score(editor, edited, [p for p, _ in loc], [a for _, a in loc], True)
        row = {
            "method": editor.method, "n_edits_in_memory": n,
            "edit_acc": sum(hits["edit"]) / len(hits["edit"]),
            "rephrase_acc": sum(hits["rephrase"]) / len(hits["rephrase"]),
            "loc_retain": sum(hits["loc"]) / len(hits["loc"]),
            "n_scored": {k: len(v) for k, v in hits.items()}, "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"editor": editor_dir, "model": editor.model_cfg.get("name"), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editors", nargs="+", required=True, help="trained editor (run) directories")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 10, 100, 1000])
    ap.add_argument("--out", default="results/serac-many-edits.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Results for other editors already in the file are kept (one editor can be re-run alone).
    previous = json.loads(out.read_text())["results"] if out.is_file() else []
    for d in args.editors:
        result = run(d, args.sizes)
        result["command"] = f"python scripts/serac_many_edits.py --editors {d} --sizes " + " ".join(map(str, args.sizes))
        previous = [r for r in previous if r["editor"] != d] + [result]
        out.write_text(json.dumps({"mode": "exact", "split": "test", "results": previous}, indent=1))


if __name__ == "__main__":
    main()
