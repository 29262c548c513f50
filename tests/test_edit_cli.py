"""edit.py on a small trained MEND checkpoint: the edit lands on the prompt and a paraphrase, an
unrelated prompt keeps its answer, sequential mode and saving the edited model work."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from metaedit.editing import answer_of, paraphrases_for, read_requests_jsonl
from metaedit.types import MetaEditError
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
# A subject of the synthetic world the tiny models know. The editor here is trained for a few hundred
# steps only (to keep the suite short), so the request is about a training-split subject; how MEND
# generalises to held-out subjects is measured by evaluate.py, not here.
PROMPT, TARGET, UNRELATED = "The capital of Zalklothros is", "Basdri", "The capital of Toudu is"


@pytest.fixture(scope="module")
def mend_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-cli")
    res = run_cli(["train.py", "method=mend", "model=tiny-gpt2", "data=synthetic", "trainer.max_steps=400",
                   "trainer.val_check_interval=1000", "evaluate_after=false", "logger=none",
                   "trainer.enable_progress_bar=false"], root, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, root / "checkpoints" / "mend-tiny-gpt2-synthetic"


def test_edit_lands_on_prompt_and_paraphrase_and_spares_unrelated(mend_run):
    root, run = mend_run
    res = run_cli(["edit.py", f"editor={run}", f"prompt={PROMPT}", f"target={TARGET}", f"unrelated=[{UNRELATED}]"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "applied 1 edit(s) together in" in out
    blocks = out.split("\n[")
    edit = next(b for b in blocks if b.startswith("edit") and PROMPT in b)
    assert "(answers target)" in edit and f"edited: '{TARGET}" in edit
    assert any(b.startswith("paraphrase") and "(answers target)" in b for b in blocks)
    unrelated = next(b for b in blocks if b.startswith("unrelated"))
    assert "(answer unchanged" in unrelated


def test_sequential_requests_file_and_saved_model(mend_run, tmp_path):
    root, run = mend_run
    reqs = tmp_path / "edits.jsonl"
    reqs.write_text(json.dumps({"prompt": PROMPT, "target": TARGET}) + "\n"
                    + json.dumps({"prompt": "The capital of Klelkou is", "target": "Tuldrourlu"}) + "\n")
    saved = tmp_path / "edited"
    res = run_cli(["edit.py", f"editor={run}", f"requests={reqs}", "mode=sequential", f"save_to={saved}",
                   "unrelated=[The leader of Zalklothros is]"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "edit 1/2 took" in res.stdout and "edit 2/2 took" in res.stdout and "after edit 2" in res.stdout
    # The saved model is a plain transformers checkpoint carrying the edits.
    model, tok = AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().startswith(TARGET)


def test_paraphrases_come_from_known_templates_and_bad_request_files_are_named(tmp_path):
    assert answer_of("Tokyo.\n\nThe Japanese Alps are") == "Tokyo"
    assert answer_of("Port Nexrir Port Nexrir Taiszis") == "Port Nexrir Port"
    assert "The seat of government of France is" in paraphrases_for("The capital of France is")
    assert paraphrases_for("Something no template matches") == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n" + json.dumps({"prompt": "p", "target": ""}) + "\n")
    with pytest.raises(MetaEditError, match=r"bad\.jsonl: line 2: edit request has an empty 'target'"):
        read_requests_jsonl(bad)
    bad.write_text("{not json}\n")
    with pytest.raises(MetaEditError, match=r"bad\.jsonl: line 1: not valid JSON"):
        read_requests_jsonl(bad)
