"""Edit-time sweep: D scaled by S (edit_scale) and e^λ by S·L; 100 val edits in one batch."""
import sys, math, json, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from metaedit.editors.io import load_editor
from metaedit.evaluation import evaluate_editor
ck, split = sys.argv[1], sys.argv[2]
pairs = [tuple(map(float, p.split(":"))) for p in sys.argv[3:]]  # S:L
with initialize_config_dir(config_dir=str(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"):
    cfg = compose(config_name="evaluate", overrides=[f"editor={ck}", "data=worldfacts_wide"])
for S, L in pairs:
    ed = load_editor(ck, cache_dir=cfg.paths.cache_dir, hparams={"edit_scale": S})
    with torch.no_grad():
        ed.log_lambdas += math.log(S * L)
    data = instantiate(cfg.data, formatter=ed.formatter, eval_n_edits=100, _recursive_=False)
    rep = evaluate_editor(ed, data, split=split, limit=100)
    m = rep["metrics"]
    print(json.dumps({"ck": ck.split("/")[-2], "S": S, "L": L, **{k: round(m[k], 3) for k in ("es", "ps", "ns", "edit_exact") if k in m}}), flush=True)
