"""The joint solve's shift sizes against the per-layer solves' (session 49): for N training-split edits
in one batch, ‖ΔW_ℓ‖/‖W_ℓ‖ per layer and how well Σ_ℓ K_ℓ ΔW_ℓᵀ delivers Σ_ℓ D_ℓ, at the editor's λ
and at λ + s for the offsets given (the editor's own preserve / covariance terms included).
Usage: python results/smollm2-worldfacts_wide/s49/joint-norms.py checkpoints/<malmen run>/best N s1 [s2 ...]"""
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaedit.editors.io import load_editor

ck, n, offsets = sys.argv[1], int(sys.argv[2]), [0.0, *map(float, sys.argv[3:])]
with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[3] / "configs"), version_base="1.3"):
    cfg = compose(config_name="evaluate", overrides=[f"editor={ck}", "data=worldfacts_wide"])
ed = load_editor(ck, cache_dir=cfg.paths.cache_dir, hparams={"solve": "joint"})
ed.eval()
ed.prepare()
data = instantiate(cfg.data, formatter=ed.formatter, eval_n_edits=n, _recursive_=False)
batch = next(iter(data.loader("train", limit=n, shuffle=False, batch_size=n)))
parts = [kd for kd, _ in ed.key_value_rows(batch.edit, batch.requests)]
keys = [torch.cat([p[i][0] for p in parts]).detach().float() for i in range(len(ed.inner_params))]
total = sum(torch.cat([p[i][1] for p in parts]).detach().float() for i in range(len(ed.inner_params)))
base = ed.log_lambdas.detach().clone()
w = [ed.model.get_parameter(p.name).detach().float().norm() for p in ed.inner_params]
with torch.no_grad():
    for mode in ("per_layer", "joint"):
        ed.solve = mode
        for s in offsets:
            ed.log_lambdas.copy_(base + s)
            shifts = ed.weight_shifts(batch.edit, batch.requests)
            fit = sum(k @ d.float().T for k, d in zip(keys, shifts))
            rel = ((fit - total).norm(dim=1) / total.norm(dim=1)).median()
            sizes = " ".join(f"{float(d.float().norm() / wn):.3f}" for d, wn in zip(shifts, w))
            print(f"n={n} {mode:9s} λ+{s:g}: ‖ΔW‖/‖W‖ {sizes} | Σ fit relres {rel:.3f}", flush=True)
