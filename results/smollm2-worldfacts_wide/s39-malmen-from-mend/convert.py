"""MALMEN editor from a trained MEND checkpoint (no MALMEN training): networks + η from MEND, λ = lambda_init."""
import sys
from metaedit.editors.io import build_editor, load_editor, save_editor
from metaedit.training import init_from_saved
from metaedit.models.loading import load_base_model

src, out, lam = sys.argv[1], sys.argv[2], float(sys.argv[3])
cov = None if sys.argv[4] == "none" else float(sys.argv[4])
mend = load_editor(src)
hp = {k: mend.hparams()[k] for k in ("rank", "edit_lr", "rows", "n_blocks", "act", "transform_delta", "stats")}
ed = build_editor("malmen", mend.model, mend.model_cfg, {**hp, "lambda_init": lam, "key_covariance": cov},
                  tokenizer=mend.formatter.tokenizer, inner_params=list(mend.inner_params))
init_from_saved(ed, src, mend.model, mend.formatter.tokenizer, None)
save_editor(ed, out)
print("saved", out, ed.hparams())
