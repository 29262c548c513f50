"""Session 44 diagnostic: where a MALMEN sequence of 10-edit steps breaks (not a benchmark: the
benchmark's sequential protocol is `evaluate.py protocol=sequential`). Every 5 steps: the NLL of the
first step's targets ("first"), of 20 of their neighbourhood prompts' true answers ("loc"), and
‖W_running − W‖/‖W‖ per inner layer. The first n wide test records, in file order.

    OMP_NUM_THREADS=1 python results/smollm2-worldfacts_wide/s44-malmen-seqdiag.py \
        checkpoints/<run>/best KEEP_EARLIER N ['{"max_shift": 0.03}']
"""
import json, sys, time
import torch
from metaedit.editors.io import load_editor
from metaedit.types import EditRequest
from metaedit.functional import forward_logits
from metaedit.losses import nll

path, keep, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.set_num_threads(1)
ed = load_editor(path, hparams={"keep_earlier": keep, **extra})
ed.eval(); ed.prepare()
recs = json.load(open("/work/main/data/worldfacts_wide-v3/test.json"))[:n]
reqs = [EditRequest(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
                    r["requested_rewrite"]["target_new"]["str"], r["requested_rewrite"]["subject"]) for r in recs]
first = ed.formatter.batch([r.prompt for r in reqs[:10]], [r.target for r in reqs[:10]])
nb = [(p, a) for r in recs[:10] for p, a in zip(r["neighborhood_prompts"][:2], r["neighborhood_answers"][:2])]
loc = ed.formatter.batch([p for p, _ in nb], [a for _, a in nb])
base = {p.name: ed.model.get_parameter(p.name).detach() for p in ed.inner_params}
with torch.no_grad():
    b_first, b_loc = float(nll(forward_logits(ed.model, first), first.targets)), float(nll(forward_logits(ed.model, loc), loc.targets))
print(f"base first {b_first:.2f} loc {b_loc:.2f}", flush=True)
t0 = time.time()
def after(k, m):
    if k % 5 and k != len(reqs) // 10 - 1:
        return
    with torch.no_grad():
        f = float(nll(forward_logits(ed.model, first, m.params), first.targets))
        l = float(nll(forward_logits(ed.model, loc, m.params), loc.targets))
        rel = [float((m.params[nm] - w).norm() / w.norm()) for nm, w in base.items()]
    print(f"step {k+1} first {f:.2f} loc {l:.2f} |dW|/|W| " + " ".join(f"{x:.3f}" for x in rel) + f"  {time.time()-t0:.0f}s", flush=True)
with torch.no_grad():
    ed.edit_sequential(reqs, after_each=after, batch_size=10)
