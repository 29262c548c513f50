"""Edit success of an untrained ENN / KE editor (its plain step ΔW = −lr·∇W) for several step sizes:
where meta-training starts from. The method's tuning file for the model applies, as in train.py
(`--override` changes it). The first `limit` val edits, one at a time, exact mode.

    python scripts/untrained_step.py enn 0.01 0.03 0.1 [--model smollm2-135m] [--data worldfacts]
        [--limit 30] [--override 'model.inner_params=[...]' ...]
"""

from __future__ import annotations

import argparse
import os

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaedit.editors.io import build_editor
from metaedit.evaluation import evaluate_editor
from metaedit.models.loading import load_base_model, make_formatter

STEP_KEY = {"enn": "edit_lr", "ke": "init_lr", "ke_constrained": "init_lr"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=sorted(STEP_KEY))
    ap.add_argument("lrs", nargs="+", type=float)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="worldfacts")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--override", action="append", default=[], help="extra train.py-style overrides")
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    with initialize_config_dir(config_dir=os.path.abspath(root), version_base=None):
        cfg = compose(config_name="train", overrides=[f"method={args.method}", f"model={args.model}",
                                                      f"data={args.data}", *args.override])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model, tokenizer = load_base_model(model_cfg, cfg.paths.cache_dir)
    data = instantiate(cfg.data, formatter=make_formatter(model, tokenizer, model_cfg), _recursive_=False)
    data.prepare_data()  # the editor's statistics or preserved facts may read the built training split
    for lr in args.lrs:
        hparams = {**OmegaConf.to_container(cfg.method.editor, resolve=True), STEP_KEY[args.method]: lr}
        editor = build_editor(args.method, model, model_cfg, hparams, tokenizer=tokenizer, cache_dir=cfg.paths.cache_dir)
        m = evaluate_editor(editor, data, split="val", limit=args.limit)["metrics"]
        print(f"{args.method} {STEP_KEY[args.method]}={lr}: edit {m['edit_acc']:.3f} rephrase {m['rephrase_acc']:.3f} "
              f"loc {m['loc_retain']:.3f} es {m.get('es', float('nan')):.3f} ps {m.get('ps', float('nan')):.3f} "
              f"ns {m.get('ns', float('nan')):.3f}", flush=True)


if __name__ == "__main__":
    main()
