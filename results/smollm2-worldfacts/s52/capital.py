"""Diagnostic (session 52): why capital's neighbours fail under rows=target editors. For the first 100
worldfacts test edits in one batch, per capital neighbourhood prompt: the mean per-token log-prob of its
own answer and of the edit's new object (and the first token's), before and after the edit.
Usage: python results/smollm2-worldfacts/s52/capital.py EDITOR_DIR [relation [swaps]]"""

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaedit.editors.io import load_editor
from metaedit.functional import forward_logits
from metaedit.losses import mean_target_logprob

relation = sys.argv[2] if len(sys.argv) > 2 else "capital"
swaps = int(sys.argv[3]) if len(sys.argv) > 3 else 0
override = {"preserve": {"data": str(Path("data/worldfacts-v2").resolve()), "weight": 1.0, "top_k": 8, "swaps": swaps}} if swaps else None
editor = load_editor(sys.argv[1], hparams=override)
with initialize_config_dir(str(Path(__file__).resolve().parents[3] / "configs"), version_base=None):
    cfg = compose("evaluate", overrides=["data=worldfacts", "editor=x"])
data = instantiate(cfg.data, formatter=editor.formatter, eval_n_edits=100, _recursive_=False)
records = data.records("test")[:100]
batch = next(iter(data.loader("test", limit=100, shuffle=False, batch_size=100)))
rel = [r.get("relation") for r in records]
with torch.no_grad():
    pre_true, pre_new = forward_logits(editor.model, batch.loc), forward_logits(editor.model, batch.loc_new)
    edited = editor.apply_edits(batch.edit, batch.requests)
    post_true, post_new = edited.logits(batch.loc), edited.logits(batch.loc_new)


def first(logits, targets):  # log P of the first target token
    lp = logits.log_softmax(-1)
    rows = (targets != -100).float().argmax(-1)
    idx = torch.arange(len(targets))
    return lp[idx, rows, targets[idx, rows]]


m = {k: mean_target_logprob(v, b.targets) for k, v, b in (("pt", pre_true, batch.loc), ("pn", pre_new, batch.loc_new),
                                                         ("qt", post_true, batch.loc), ("qn", post_new, batch.loc_new))}
f = {k: first(v, b.targets) for k, v, b in (("pt", pre_true, batch.loc), ("pn", pre_new, batch.loc_new),
                                             ("qt", post_true, batch.loc), ("qn", post_new, batch.loc_new))}
print("prompt | answer | new | mean lp true pre→post | mean lp new pre→post | first-token lp true / new post | ns")
for j, owner in enumerate(batch.loc_owner.tolist()):
    if rel[owner] != relation:
        continue
    ok = bool(m["qt"][j] > m["qn"][j])
    print(f"{batch.loc_prompts[j]!r} | {batch.loc_answers[j]} | {batch.requests[owner].target} | "
          f"{m['pt'][j]:.2f}→{m['qt'][j]:.2f} | {m['pn'][j]:.2f}→{m['qn'][j]:.2f} | "
          f"{f['qt'][j]:.2f} / {f['qn'][j]:.2f} | {'ok' if ok else 'FAIL'}")
