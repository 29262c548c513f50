"""How well MALMEN's solve delivers its value shifts on the first 100 val edits (session 41, README):
per layer, key norms, KᵀK's spectrum against e^λ, ‖K ΔWᵀ − D‖/‖D‖ and the keys' mutual cosines.
Usage: python results/smollm2-worldfacts_wide/s41-malmen-solve-fit.py checkpoints/<malmen run>/best"""
import sys, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from metaedit.editors.io import load_editor
ck = sys.argv[1]
with initialize_config_dir(config_dir=str(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"):
    cfg = compose(config_name="evaluate", overrides=[f"editor={ck}", "data=worldfacts_wide"])
ed = load_editor(ck, cache_dir=cfg.paths.cache_dir)
ed.eval(); ed.prepare()
data = instantiate(cfg.data, formatter=ed.formatter, eval_n_edits=100, _recursive_=False)
batch = next(iter(data.loader("val", limit=100, shuffle=False, batch_size=100)))
rows = []  # per chunk: (u, ũ, δ̃) for every layer (capture needs autograd on)
for part, req in ed.chunks(batch.edit, batch.requests):
    r = ed.capture(part, req)
    pairs = ed.transform(r)
    rows.append([(k.detach(), kt.detach(), dt.detach()) for (k, _), (kt, dt) in zip(r, pairs)])
torch.set_grad_enabled(False)
for i in range(len(ed.inner_params)):
    K = torch.cat([c[i][0] for c in rows]); KT = torch.cat([c[i][1] for c in rows]); DT = torch.cat([c[i][2] for c in rows])
    D = (ed.step_size(i) * (K * KT).sum(-1, keepdim=True)) * DT
    G = K.T @ K
    ev = torch.linalg.eigvalsh(G)
    lam = ed.log_lambdas[i].exp()
    ridges = ed.covariance.covariances(ed, G) if ed.covariance.enabled else None
    R = None if ridges is None else ridges[i]
    from metaedit.editors.malmen.editor import solve_shift
    dW = solve_shift(G, D.T @ K, ed.log_lambdas[i], R)
    fit = K @ dW.T
    rel = ((fit - D).norm(dim=1) / D.norm(dim=1)).median()
    cos = torch.nn.functional.cosine_similarity(fit, D, dim=1).median()
    ratio = (fit.norm(dim=1) / D.norm(dim=1)).median()
    Kn = K / K.norm(dim=1, keepdim=True)
    offd = (Kn @ Kn.T - torch.eye(len(K))).abs().sum() / (len(K) * (len(K) - 1))
    print(f"{ed.inner_params[i].name}: rows {len(K)} |k|med {K.norm(dim=1).median():.3f} eig top {ev[-1]:.3g} "
          f"eig#{len(K)} {ev[-len(K)]:.3g} e^λ {lam:.3g} | |d|med {D.norm(dim=1).median():.3g} "
          f"fit/d norm {ratio:.3f} cos {cos:.3f} relres {rel:.3f} | key cos offdiag mean {offd:.3f} η {ed.step_size(i).item():.4g}")
