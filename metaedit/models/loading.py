"""Load base models by family through transformers' Auto classes; tiny models are built on demand."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from metaedit.data.formatting import FAMILIES, Formatter
from metaedit.paths import default_cache_dir
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "seq_classifier": AutoModelForSequenceClassification,
}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_model_config(name: str) -> dict[str, Any]:
    """A model config by name, outside Hydra (the tiny-model command, tests)."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise MetaEditError(f"unknown model {name!r}; valid: {available('model')}")
    return yaml.safe_load(path.read_text())


def tiny_model_dir(model_cfg: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    # The recipe's hash is part of the name: changing the architecture or world never reuses a stale build.
    recipe = json.dumps(model_cfg["tiny"], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    return Path(cache_dir or default_cache_dir()) / "tiny" / f"{model_cfg['name']}-{digest}"


def _model_path(model_cfg: dict[str, Any], cache_dir: str | Path | None) -> str | Path:
    family = model_cfg.get("family")
    if family not in FAMILIES:
        raise MetaEditError(f"model {model_cfg.get('name')!r}: unknown family {family!r}; valid: {list(FAMILIES)}")
    if model_cfg.get("tiny"):
        from metaedit.models.tiny import build_tiny_model

        return build_tiny_model(tiny_model_dir(model_cfg, cache_dir), family=family, **model_cfg["tiny"])
    if model_cfg.get("gguf"):
        from metaedit.models.gguf import convert_gguf

        return convert_gguf(model_cfg["name"], model_cfg["gguf"], cache_dir or default_cache_dir())
    if model_cfg.get("pretrained"):
        return model_cfg["pretrained"]
    raise MetaEditError(f"model {model_cfg.get('name')!r}: give one of 'pretrained', 'gguf' or 'tiny'")


def load_tokenizer(model_cfg: dict[str, Any], cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    path = _model_path(model_cfg, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise MetaEditError(f"model {model_cfg.get('name')!r}: cannot load a tokenizer from {path!r} ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_cfg: dict[str, Any], cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a model config; the model is frozen and in eval mode."""
    path = _model_path(model_cfg, cache_dir)
    kwargs: dict[str, Any] = {}
    if model_cfg.get("dtype"):
        kwargs["dtype"] = getattr(torch, model_cfg["dtype"])
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    try:
        model = AUTO_CLASSES[model_cfg["family"]].from_pretrained(path, **kwargs)
    except OSError as e:
        raise MetaEditError(f"model {model_cfg.get('name')!r}: cannot load {path!r} ({e})") from None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def make_formatter(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_cfg: dict[str, Any]) -> Formatter:
    return Formatter(
        tokenizer,
        model_cfg["family"],
        max_length=int(model_cfg.get("max_length", 128)),
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
        label2id=getattr(model.config, "label2id", None),
    )
