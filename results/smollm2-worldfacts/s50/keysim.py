# Which block's answer-position MLP key tells an edit's paraphrases from its neighbours?
# For val records: per layer, similarity of the edit prompt's key (down_proj input at the last prompt
# token) to its paraphrases' and to its neighbours' keys, raw cosine and whitened by the training
# prompts' key second moment (what a ridge-regularised solve's leakage follows).
# python results/smollm2-worldfacts/s50/keysim.py (needs data/worldfacts-v2; ~1.5 min on one thread)
import json

import torch

from metaedit.models.loading import load_base_model, load_model_config

torch.manual_seed(0)
model, tok = load_base_model(load_model_config("smollm2-135m"))
L = len(model.model.layers)
caps = {}
def hook(i):
    def f(mod, args):
        caps[i] = args[0].detach()
    return f
for i, blk in enumerate(model.model.layers):
    blk.mlp.down_proj.register_forward_pre_hook(hook(i))

def keys(prompts):
    out = []
    for j in range(0, len(prompts), 32):
        enc = tok(prompts[j:j+32], return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**enc)
        last = enc["attention_mask"].sum(1) - 1  # right padding
        out.append(torch.stack([caps[i][torch.arange(len(last)), last] for i in range(L)], 1))
    return torch.cat(out)  # n, L, d
tok.padding_side = "right"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
val = json.load(open("data/worldfacts-v2/val.json"))[:60]
train = json.load(open("data/worldfacts-v2/train.json"))
g = torch.Generator().manual_seed(0)
tr = [train[i] for i in torch.randperm(len(train), generator=g)[:300].tolist()]
bank = []
for r in tr:
    rw = r["requested_rewrite"]
    bank.append(rw["prompt"].format(rw["subject"]))
    bank += r["paraphrase_prompts"][:1] + r["neighborhood_prompts"][:2]
Kb = keys(bank).float()  # n, L, d
res = {k: torch.zeros(L) for k in ["para", "neigh", "wpara", "wneigh"]}
Cinv = []
for i in range(L):
    C = Kb[:, i].T @ Kb[:, i] / len(Kb)
    C = C + 1e-2 * C.diagonal().mean() * torch.eye(C.shape[0])
    Cinv.append(torch.linalg.inv(C))
def cos(a, b): return torch.nn.functional.cosine_similarity(a, b, dim=-1)
for r in val:
    rw = r["requested_rewrite"]
    ps = [rw["prompt"].format(rw["subject"])] + r["paraphrase_prompts"] + r["neighborhood_prompts"]
    K = keys(ps).float()
    np_ = len(r["paraphrase_prompts"])
    e, P, N = K[0], K[1:1+np_], K[1+np_:]
    for i in range(L):
        res["para"][i] += cos(e[i][None], P[:, i]).mean() / len(val)
        res["neigh"][i] += cos(e[i][None], N[:, i]).mean() / len(val)
        we = Cinv[i] @ e[i]  # leakage of a min-norm fit to e onto x ∝ xᵀC⁻¹e / eᵀC⁻¹e
        den = e[i] @ we
        res["wpara"][i] += ((P[:, i] @ we) / den).mean() / len(val)
        res["wneigh"][i] += ((N[:, i] @ we) / den).abs().mean() / len(val)
print("layer  cos_para cos_neigh gap | whitened response para neigh ratio")
for i in range(L):
    print(f"{i:5d} {res['para'][i]:.3f} {res['neigh'][i]:.3f} {res['para'][i]-res['neigh'][i]:+.3f} | {res['wpara'][i]:.3f} {res['wneigh'][i]:.3f} {res['wpara'][i]/res['wneigh'][i]:.2f}")
