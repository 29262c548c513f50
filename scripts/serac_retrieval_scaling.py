"""Retrieval scaling: time for a SERAC-edited model to answer a batch of 64 inputs with 10 edits in
memory vs 10,000 edits in memory (the same 10 real edits plus 9,990 distractors).

    python scripts/serac_retrieval_scaling.py --editor checkpoints/serac-tiny-gpt2-synthetic

"Answer" = `edited.logits(batch)`: encode the 64 inputs, one [64, memory] similarity, route, run the
base and the counterfactual model on their rows. Edit keys are computed when the edits are added
(not timed). The 64 inputs are the 10 edits' 30 rephrases and 34 locality inputs. How many rows go
to the counterfactual model depends on the classifier (a weak one routes more rows when the memory
is large), so retrieval alone (`route`) is timed too. Both sizes are timed alternately in one
process (medians).
Writes results/serac-retrieval-scaling.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from metaedit.data.synthetic import TEMPLATES, _unique_words, build_world, edit_records
from metaedit.editors.io import load_editor
from metaedit.types import EditRequest


def distractors(world, n: int, seed: int = 1234) -> list[EditRequest]:
    """`n` edits about made-up subjects (new names from the world's name generator, relations and
    targets from the world): they share no subject with any scored prompt, so they can only make
    retrieval harder, never change a correct answer."""
    rng = random.Random(seed)
    taken = set(world.subjects) | {o for objs in world.objects.values() for o in objs}
    names = _unique_words(rng, (n + 3) // 4, (2, 3), taken)
    out = [EditRequest(TEMPLATES[r][0][0].format(s), rng.choice(world.objects[r])) for s in names for r in TEMPLATES]
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", required=True)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="results/serac-retrieval-scaling.json")
    args = ap.parse_args()

    editor = load_editor(args.editor)
    editor.eval()
    world = build_world(seed=0, n_subjects=200)
    records = edit_records(world, "test", n_loc=4)[: args.small]
    reqs = [EditRequest(r["prompt"], r["target_new"]) for r in records]
    covered = {t.format(r["subject"]) for r in records for t in sum(TEMPLATES[r["relation"]], [])}
    inputs = [(p, r["target_new"]) for r in records for p in r["rephrases"]]
    pool = [(x["prompt"], x["answer"]) for r in edit_records(world, "test", n_loc=4) for x in r["locality"]]
    inputs += [x for x in pool if x[0] not in covered][: args.batch - len(inputs)]
    batch = editor.formatter.batch([p for p, _ in inputs], [t for _, t in inputs])

    with torch.no_grad():
        t0 = time.perf_counter()
        small = editor.edit(reqs)
        large = editor.edit(reqs + distractors(world, args.large - args.small))
        keys_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {"small": [], "large": [], "route_small": [], "route_large": []}
        outs, routed = {}, {}
        for i in range(args.repeats + 1):
            for name, edited in (("small", small), ("large", large)):
                edited._memo = None  # each timed call encodes its inputs (no memo from the last call)
                t = time.perf_counter()
                outs[name] = edited.logits(batch)
                edited._memo = None
                t1 = time.perf_counter()
                # Retrieval (encode the 64 inputs, one [64, memory] similarity, argmax, τ):
                # unlike the full answer, it does not depend on which model each row is sent to.
                routed[name] = edited.route(batch.prompts)[1]
                if i:  # the first round is a warm-up
                    times[name].append((t1 - t) * 1000)
                    times[f"route_{name}"].append((time.perf_counter() - t1) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = (outs["small"].argmax(-1) == outs["large"].argmax(-1)).all(-1).float().mean().item()
    row = {"editor": args.editor, "batch": len(inputs), "memory_small": len(small.memory), "memory_large": len(large.memory),
           "ms_small": round(med["small"], 1), "ms_large": round(med["large"], 1),
           "ratio": round(med["large"] / med["small"], 3),
           "route_ms_small": round(med["route_small"], 1), "route_ms_large": round(med["route_large"], 1),
           "route_ratio": round(med["route_large"] / med["route_small"], 3),
           "rows_routed_small": int(routed["small"].sum()), "rows_routed_large": int(routed["large"].sum()),
           "same_greedy_answers": same, "repeats": args.repeats, "threads": torch.get_num_threads(),
           "seconds_to_embed_all_edits": round(keys_s, 1)}
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": f"python scripts/serac_retrieval_scaling.py --editor {args.editor}",
                                          **row, "times_ms": times}, indent=1))


if __name__ == "__main__":
    main()
