"""Inner-param specs resolve to the intended matrices for every configured architecture."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from metaedit.models.inner_params import resolve_inner_params
from metaedit.models.loading import CONFIG_DIR
from metaedit.types import MetaEditError

SMALL = {
    "gpt2": {"n_layer": 5, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32},
    "gptj": {"n_layer": 5, "n_embd": 32, "n_head": 2, "rotary_dim": 8, "vocab_size": 64, "n_positions": 32},
    "llama": {"num_hidden_layers": 5, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 64},
    "t5": {"num_layers": 4, "num_decoder_layers": 4, "d_model": 32, "d_ff": 48, "d_kv": 8, "num_heads": 2,
           "vocab_size": 64, "feed_forward_proj": "gated-gelu"},
    "bart": {"encoder_layers": 4, "decoder_layers": 4, "d_model": 32, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 32},
    "bert": {"num_hidden_layers": 5, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
             "vocab_size": 64, "num_labels": 2},
}
AUTO = {"causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM,
        "seq_classifier": AutoModelForSequenceClassification}

EXPECTED = {
    "gpt2": [f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3, 4) for m in ("c_fc", "c_proj")],
    "gptj": [f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3, 4) for m in ("fc_in", "fc_out")],
    "llama": [f"model.layers.{i}.mlp.{m}.weight" for i in (2, 3, 4) for m in ("gate_proj", "up_proj", "down_proj")],
    "t5": [f"encoder.block.{i}.layer.1.DenseReluDense.{m}.weight" for i in (2, 3) for m in ("wi_0", "wi_1", "wo")]
    + [f"decoder.block.{i}.layer.2.DenseReluDense.{m}.weight" for i in (2, 3) for m in ("wi_0", "wi_1", "wo")],
    "bart": [f"model.encoder.layers.{i}.{m}.weight" for i in (2, 3) for m in ("fc1", "fc2")]
    + [f"model.decoder.layers.{i}.{m}.weight" for i in (2, 3) for m in ("fc1", "fc2")],
    "bert": [f"bert.encoder.layer.{i}.{m}.dense.weight" for i in (2, 3, 4) for m in ("intermediate", "output")],
}
SCALE_CONFIGS = ["gpt2", "gpt2-xl", "gpt-j-6b", "t5-small", "t5-large", "t5-xl", "t5-xxl", "bart-base", "bert-base",
                 "llama-3-8b"]


def tiny_random(arch: str, family: str):
    torch.manual_seed(0)
    return AUTO[family].from_config(AutoConfig.for_model(arch, **SMALL[arch]))


@pytest.mark.parametrize("name", SCALE_CONFIGS)
def test_scale_config_resolves_to_intended_matrices(name):
    cfg = yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text())
    model = tiny_random(cfg["arch"], cfg["family"])
    params = resolve_inner_params(model, cfg["inner_params"])
    assert [p.name for p in params] == EXPECTED[cfg["arch"]]
    for p in params:
        w = model.get_parameter(p.name)
        # Conv1D (GPT-2) stores [in, out]; Linear stores [out, in]; the spec must know which.
        assert tuple(w.shape) == ((p.d_in, p.d_out) if p.transposed else (p.d_out, p.d_in))
        assert p.transposed == (cfg["arch"] == "gpt2")
    sides = {p.side for p in params}
    assert sides == ({"input", "output"} if cfg["family"] == "seq2seq_lm" else {"input"} if cfg["arch"] == "bert" else {"output"})


def test_pattern_matching_nothing_is_refused():
    model = tiny_random("gpt2", "causal_lm")
    with pytest.raises(MetaEditError, match="matches no Linear/Conv1D"):
        resolve_inner_params(model, [{"container": "transformer.h", "layers": [-1], "pattern": r"mlp\.nope"}])


def test_bad_container_and_layer_are_refused():
    model = tiny_random("gpt2", "causal_lm")
    with pytest.raises(MetaEditError, match="no module 'transformer.blocks'"):
        resolve_inner_params(model, [{"container": "transformer.blocks", "layers": [0], "pattern": "mlp.c_fc"}])
    with pytest.raises(MetaEditError, match="out of range"):
        resolve_inner_params(model, [{"container": "transformer.h", "layers": [9], "pattern": r"mlp\.c_fc"}])


def test_non_linear_match_is_refused():
    model = tiny_random("gpt2", "causal_lm")
    with pytest.raises(MetaEditError, match="not a Linear/Conv1D"):
        resolve_inner_params(model, [{"container": "transformer.h", "layers": [0], "pattern": "ln_1"}])


def test_depth_fractions_pick_the_same_part_of_deep_and_shallow_models():
    spec = [{"container": "model.layers", "depth": [0.1, 0.25], "pattern": r"mlp\.down_proj"}]
    deep = AUTO["causal_lm"].from_config(AutoConfig.for_model("llama", **{**SMALL["llama"], "num_hidden_layers": 30}))
    assert [p.name for p in resolve_inner_params(deep, spec)] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3, 8)]
    shallow = tiny_random("llama", "causal_lm")  # 5 blocks: 1/5 lies in [0.1, 0.25)
    assert [p.name for p in resolve_inner_params(shallow, spec)] == ["model.layers.1.mlp.down_proj.weight"]
    narrow = [{**spec[0], "depth": [0.9, 0.91]}]  # no block starts inside: the nearest one after lo
    assert [p.name for p in resolve_inner_params(shallow, narrow)] == ["model.layers.4.mlp.down_proj.weight"]
    for bad, message in [({"depth": [0.5, 0.2]}, "0 <= lo < hi"), ({"depth": "x"}, "two fractions"),
                         ({"depth": [0.1, 0.2], "layers": [0]}, "exactly one")]:
        with pytest.raises(MetaEditError, match=message):
            resolve_inner_params(shallow, [{"container": "model.layers", "pattern": r"mlp\.down_proj", **bad}])
