"""Scratch probe (session 47; ENN preserve before it was an editor option — the option reproduces it): untrained ENN step (rows=target, whitening) with the preserved-keys Woodbury term."""
import sys
import types

import torch

sys.path.insert(0, "/work/main")
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaedit.editors.io import build_editor
from metaedit.editors.preserve import PreservedKeys
from metaedit.editors.rows import per_edit_gradients
from metaedit.evaluation import evaluate_editor
from metaedit.functional import EditedModel, forward_logits
from metaedit.hooks import capture_layer_io
from metaedit.models.loading import load_base_model, make_formatter

mus = [float(x) for x in sys.argv[1].split(",")]
lrs = [float(x) for x in sys.argv[2].split(",")]
topk = int(sys.argv[3]) if len(sys.argv) > 3 else 8
ov = ["method=enn", "model=smollm2-135m", "data=worldfacts",
      "model.inner_params=[{container: model.layers, layers: [-6, -5, -4, -3, -2, -1], pattern: 'mlp\\.down_proj'}]",
      "method.editor.rows=target", "method.editor.key_whitening=0.01",
      "+method.editor.stats.corpus=/work/runs/s46/facts-corpus-v2", "+method.editor.stats.n_tokens=40000"]
with initialize_config_dir(config_dir="/work/main/configs", version_base=None):
    cfg = compose(config_name="train", overrides=ov)
mc = OmegaConf.to_container(cfg.model, resolve=True)
model, tok = load_base_model(mc, cfg.paths.cache_dir)
data = instantiate(cfg.data, formatter=make_formatter(model, tok, mc), _recursive_=False)
hp = OmegaConf.to_container(cfg.method.editor, resolve=True)
ed = build_editor("enn", model, mc, {**hp, "edit_lr": lrs[0]}, tokenizer=tok, cache_dir=cfg.paths.cache_dir)
ed.prepare()
pk = PreservedKeys(model, ed.inner_params, {"data": "/work/main/data/worldfacts-v2", "top_k": topk, "weight": 1.0})
pk.prepare(ed)
state = {"mu": 1.0}

def apply_edits(self, edit, requests):
    params = self.current_params()
    names = self.trained_names[: len(self.inner_params)]
    lrs_ = self.log_lrs.exp()
    view = {n: v.detach() for n, v in params.items()}
    total = per_edit_gradients(self.model, self.inner_params, edit, "target", self.formatter, requests, view, summed=True)
    mods = {p.module_name: self.model.get_submodule(p.module_name) for p in self.inner_params}
    with torch.no_grad(), capture_layer_io(mods) as io:
        forward_logits(self.model, edit, view)
    keep = edit.targets != -100
    excluded = pk.excluded_rows([r.subject for r in requests], list(edit.prompts or ()))
    inv = self.whitening.matrices(self, total[0])
    for i, (n, g) in enumerate(zip(names, total)):
        g = g.float()
        a = inv[i]
        w = g @ a
        if state["mu"] > 0:
            k = io[self.inner_params[i].module_name][0][keep].float()
            rows = pk.nearest(i, k, excluded).unique()
            if len(rows):
                u = (state["mu"] ** 0.5) * pk._keys[i][rows].T  # d × m
                au = a @ u
                m = torch.eye(u.shape[1]) + u.T @ au
                w = w - (w @ u) @ torch.linalg.solve(m, au.T)
        w = w * (g * g).sum() / (g * w).sum()
        params[n] = params[n] - (lrs_[i] * w).to(params[n].dtype)
    return EditedModel(self.model, params)

ed.apply_edits = types.MethodType(apply_edits, ed)
for mu in mus:
    state["mu"] = mu
    for lr in lrs:
        with torch.no_grad():
            ed.log_lrs.fill_(torch.tensor(lr).log())
        m = evaluate_editor(ed, data, split="val", limit=30)["metrics"]
        print(f"mu={mu} top_k={topk} lr={lr}: edit {m['edit_acc']:.3f} es {m['es']:.3f} ps {m['ps']:.3f} loc {m['loc_retain']:.3f} ns {m.get('ns', float('nan')):.3f}", flush=True)
