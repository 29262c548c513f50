"""The tiny base models know their world before any edit (the premise of every edit test)."""

from __future__ import annotations

import json
import random

import pytest

from metaedit.data.synthetic import build_world, pretraining_pairs
from metaedit.models.loading import make_formatter, tiny_model_dir
from metaedit.models.tiny import exact_accuracy


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_tiny_base_knows_its_facts(tiny, name):
    model, tok, cfg = tiny(name)
    info = json.loads((tiny_model_dir(cfg) / "pretrain.json").read_text())
    assert info["exact_acc"] >= 0.95 and info["world"] == cfg["tiny"]["world"]
    pairs = random.Random(0).sample(pretraining_pairs(build_world(**cfg["tiny"]["world"])), 600)
    assert exact_accuracy(model, make_formatter(model, tok, cfg), pairs) >= 0.95
    assert not model.training
