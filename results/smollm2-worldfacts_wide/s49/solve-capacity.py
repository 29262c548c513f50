"""Does MALMEN's per-layer solve have room for 1000 edits? (session 49) For N training-split edits
in one batch: rows of K per layer against d_in, KᵀK's effective rank, and how well the solved ΔW
(with the editor's own preserve / covariance terms) delivers each row's value shift:
median ‖K ΔWᵀ − D‖/‖D‖ and cosine. Training-split edits: a property of row counts, not of held-out data.
Usage: python results/smollm2-worldfacts_wide/s49/solve-capacity.py checkpoints/<malmen run>/best N [N ...]
(NOPRES=1: without the saved preserve term). The joint lines solve with e^λ I (no preserve rows, no
covariance ridge); joint-norms.py runs the editor's own joint solve."""
import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from metaedit.editors.io import load_editor

ck, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[3] / "configs"), version_base="1.3"):
    cfg = compose(config_name="evaluate", overrides=[f"editor={ck}", "data=worldfacts_wide"])
ed = load_editor(ck, cache_dir=cfg.paths.cache_dir, hparams={"preserve": None} if os.environ.get("NOPRES") else None)
ed.eval()
ed.prepare()
for n in sizes:
    data = instantiate(cfg.data, formatter=ed.formatter, eval_n_edits=n, _recursive_=False)
    batch = next(iter(data.loader("train", limit=n, shuffle=False, batch_size=n)))
    shifts = [s.detach() for s in ed.weight_shifts(batch.edit, batch.requests)]
    caps = []
    for part, req in ed.chunks(batch.edit, batch.requests):
        r = ed.capture(part, req)
        pairs = ed.transform(r)
        caps.append([(k.detach(), kt.detach(), dt.detach()) for (k, _), (kt, dt) in zip(r, pairs)])
    keys, total, per_layer_sum = [], None, None
    with torch.no_grad():
        for i, p in enumerate(ed.inner_params):
            K = torch.cat([c[i][0] for c in caps]).float()
            D = (ed.step_size(i) * (K * torch.cat([c[i][1] for c in caps])).sum(-1, keepdim=True)) * torch.cat([c[i][2] for c in caps])
            fit = K @ shifts[i].float().T
            rel = ((fit - D.float()).norm(dim=1) / D.float().norm(dim=1)).median()
            cos = torch.nn.functional.cosine_similarity(fit, D.float(), dim=1).median()
            ev = torch.linalg.eigvalsh(K.T @ K).flip(0)
            erank = int((ev.cumsum(0) / ev.sum() < 0.99).sum()) + 1
            print(f"n={n} {p.module_name}: rows {len(K)} d_in {K.shape[1]} rank99% {erank} "
                  f"e^λ {ed.log_lambdas[i].exp():.3g} | fit relres {rel:.3f} cos {cos:.3f}", flush=True)
            keys.append(K)
            total = D.float() if total is None else total + D.float()
            per_layer_sum = K @ shifts[i].float().T if per_layer_sum is None else per_layer_sum + K @ shifts[i].float().T
        # One solve over all layers' keys side by side (the layers write into one residual stream):
        # x_ℓ = e^{-λ_ℓ} K_ℓᵀ (Σ_m e^{-λ_m} K_m K_mᵀ + I)⁻¹ D̂, D̂ = Σ_ℓ D_ℓ, fit = Σ_ℓ K_ℓ x_ℓ.
        inv = [(-ed.log_lambdas[i].detach()).exp().float() for i in range(len(keys))]
        gram = sum(w * (K @ K.T) for w, K in zip(inv, keys))
        ev = torch.linalg.eigvalsh(gram).flip(0)
        erank = int((ev.cumsum(0) / ev.sum() < 0.99).sum()) + 1
        alpha = torch.linalg.solve(gram + torch.eye(len(gram)), total)
        fit = gram @ alpha
        for name, f in (("per-layer solves, summed", per_layer_sum), ("one joint solve", fit)):
            rel = ((f - total).norm(dim=1) / total.norm(dim=1)).median()
            cos = torch.nn.functional.cosine_similarity(f, total, dim=1).median()
            print(f"n={n} {name} vs Σ_ℓ D_ℓ: joint rank99% {erank} | relres {rel:.3f} cos {cos:.3f}", flush=True)
