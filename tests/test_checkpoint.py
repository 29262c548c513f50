"""Editor checkpoints: bit-exact round trip, no base weights, clear refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from metaedit import load_editor
from metaedit.editors.io import CONFIG, WEIGHTS
from metaedit.types import MetaEditError
from tests.test_editors import requests


def trained_like(ed):
    """Give a fresh MEND editor non-trivial weights and normalisation statistics."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ed.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    ed.train()
    ed.apply_edits(ed.formatter.batch(*zip(*requests(4))), [])
    ed.eval()
    return ed


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_mend_checkpoint_round_trips_bit_for_bit(make_editor, tiny, tmp_path, name):
    ed = trained_like(make_editor("mend", name))
    ed.save_pretrained(str(tmp_path / "ed"))
    model, tok, _ = tiny(name)
    loaded = load_editor(tmp_path / "ed", model=model)
    for k, v in ed.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    reqs = requests(2)
    a, b = ed.edit(reqs).params, loaded.edit(reqs).params
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The directory holds no base weights: no base parameter name, no tensor equal to a base tensor.
    files = sorted(p.name for p in (tmp_path / "ed").iterdir())
    assert files == [WEIGHTS, CONFIG]
    saved = load_file(str(tmp_path / "ed" / WEIGHTS))
    base = dict(model.state_dict())
    assert not set(saved) & set(base)
    for t in saved.values():
        assert not any(t.shape == w.shape and torch.equal(t, w) for w in base.values())
    config = json.loads((tmp_path / "ed" / CONFIG).read_text())
    assert config["method"] == "mend" and config["base_model"]["config"]["name"] == name
    assert config["inner_params"] and config["base_model"]["fingerprint"].startswith("sha256:")
    size = sum(p.stat().st_size for p in (tmp_path / "ed").iterdir())
    print(f"{name} MEND editor checkpoint: {size / 2**20:.1f} MiB")


def test_load_editor_without_model_loads_the_named_base(make_editor, tmp_path):
    ed = make_editor("ft", "tiny-gpt2", steps=7)
    ed.save_pretrained(str(tmp_path / "ft"))
    assert load_file(str(tmp_path / "ft" / WEIGHTS)) == {}  # FT's checkpoint holds only hyper-parameters
    loaded = load_editor(tmp_path / "ft")
    assert loaded.method == "ft" and loaded.steps == 7 and loaded.model is not ed.model
    assert loaded.edit(requests(1)).params


def test_fingerprint_mismatch_is_refused_unless_forced(make_editor, tmp_path):
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    other = copy.deepcopy(ed.model)
    with torch.no_grad():
        other.get_parameter("transformer.wte.weight").mul_(1.5)
    with pytest.raises(MetaEditError, match=r"trained for base model 'tiny-gpt2' \(fingerprint sha256:\w+\) but the given model has fingerprint sha256:"):
        load_editor(tmp_path / "ed", model=other)
    assert load_editor(tmp_path / "ed", model=other, force=True).method == "mend"


def test_missing_or_incomplete_editor_directory(make_editor, tmp_path):
    with pytest.raises(MetaEditError, match="editor directory not found"):
        load_editor(tmp_path / "nope")
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    (tmp_path / "ed" / WEIGHTS).unlink()
    with pytest.raises(MetaEditError, match="incomplete editor directory .*missing editor.safetensors"):
        load_editor(tmp_path / "ed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetaEditError, match="missing editor_config.json, editor.safetensors"):
        load_editor(tmp_path / "empty")


def test_saving_over_an_existing_editor_is_atomic(make_editor, tmp_path):
    ed = make_editor("mend", "tiny-gpt2")
    ed.save_pretrained(str(tmp_path / "ed"))
    with torch.no_grad():
        ed.edit_lrs.fill_(0.5)
    ed.save_pretrained(str(tmp_path / "ed"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ed"]  # no temp dirs left behind
    assert load_file(str(tmp_path / "ed" / WEIGHTS))["edit_lrs"].eq(0.5).all()
