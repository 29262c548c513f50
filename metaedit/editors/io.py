"""Building editors by method name and loading saved ones (writing them is `checkpoint.py`, which
the base class uses without this module's registry of every editor)."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from metaedit.editors.base import Editor
from metaedit.editors.checkpoint import CONFIG, WEIGHTS, editor_digest, resolve_editor_dir, save_editor
from metaedit.editors.registry import editor_class
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam, resolve_inner_params
from metaedit.models.loading import load_base_model, load_tokenizer, make_formatter
from metaedit.types import MetaEditError

log = logging.getLogger(__name__)
__all__ = ["build_editor", "editor_digest", "load_editor", "model_config_for", "resolve_editor_dir", "save_editor"]


def model_config_for(method: str, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """`model_cfg` plus what the method's editor class declares it needs from the loaded base (an
    attention implementation); an explicit choice in the model config wins."""
    cls = editor_class(method)
    out = dict(model_cfg)
    if cls.attn_implementation and not out.get("attn_implementation"):
        out["attn_implementation"] = cls.attn_implementation
        log.info("method %s: loading the base with attn_implementation=%r", method, cls.attn_implementation)
    return out


def build_editor(
    method: str,
    model: PreTrainedModel,
    model_cfg: dict[str, Any],
    hparams: dict[str, Any],
    tokenizer: Any | None = None,
    inner_params: list[InnerParam] | None = None,
    cache_dir: str | Path | None = None,
) -> Editor:
    """Construct an editor for `model`; the model config travels with it into checkpoints.

    Hyper-parameters the method config leaves unset (None) take the model config's value where the
    editor class maps them to one (`Editor.hparams_from_model`)."""
    cls = editor_class(method)
    inner = inner_params if inner_params is not None else resolve_inner_params(model, model_cfg.get("inner_params"))
    hparams = dict(hparams)
    for key, dotted in cls.hparams_from_model.items():
        if hparams.get(key) is None:
            node: Any = model_cfg
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                hparams[key] = node
    try:
        editor = cls(model, inner, **hparams)
    except TypeError as e:
        raise MetaEditError(f"method {method!r}: bad hyper-parameters {hparams}: {e}") from None
    editor.model_cfg = dict(model_cfg)  # type: ignore[assignment]
    editor.cache_dir = str(cache_dir) if cache_dir is not None else None
    if tokenizer is not None:
        editor.formatter = make_formatter(model, tokenizer, model_cfg)
    return editor


def load_editor(
    path: str | Path,
    model: PreTrainedModel | None = None,
    *,
    tokenizer: Any | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> Editor:
    """Load a saved editor onto `model`, or onto the base model its checkpoint names (built or
    converted models are looked up in `cache_dir`, default $METAEDIT_CACHE or ~/.cache/metaedit).

    `hparams` overrides saved hyper-parameters that leave the trained tensors' shapes alone (MEND's
    edit_scale, chunk_size); one the method does not take, or one that changes a shape, is refused."""
    path = resolve_editor_dir(path)
    try:
        config = json.loads((path / CONFIG).read_text())
        method, base = config["method"], config["base_model"]
        model_cfg = base["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MetaEditError(f"{path / CONFIG}: unreadable editor config ({e!r})") from None
    if model is None:
        model, tokenizer = load_base_model(model_cfg, cache_dir)
    elif tokenizer is None:
        tokenizer = load_tokenizer(model_cfg, cache_dir)
    if device is not None:
        model.to(device)
    found = fingerprint(model)
    if found != base["fingerprint"] and not force:
        raise MetaEditError(
            f"editor {path} was trained for base model {model_cfg.get('name')!r} (fingerprint "
            f"{base['fingerprint']}) but the given model has fingerprint {found}; pass force=True to use it anyway"
        )
    inner = [InnerParam(**p) for p in config["inner_params"]]
    for p in inner:
        try:
            w = model.get_parameter(p.name)
        except AttributeError:
            raise MetaEditError(f"editor {path}: base model has no parameter {p.name}") from None
        expected = (p.d_in, p.d_out) if p.transposed else (p.d_out, p.d_in)
        if tuple(w.shape) != expected:
            raise MetaEditError(f"editor {path}: {p.name} has shape {tuple(w.shape)}, editor expects {expected}")
    saved = config["hparams"]
    if hparams:
        unknown = sorted(set(hparams) - set(inspect.signature(editor_class(method)).parameters) - {"model", "inner_params"})
        if unknown:
            raise MetaEditError(f"editor {path}: {method} has no hyper-parameter {unknown} to override "
                                f"(saved: {sorted(saved)})")
        log.info("editor %s: overriding saved hyper-parameters %s", path, dict(hparams))
        saved = {**saved, **hparams}
    editor = build_editor(method, model, model_cfg, saved, tokenizer=tokenizer, inner_params=inner,
                          cache_dir=cache_dir)
    state = load_file(str(path / WEIGHTS))
    try:
        editor.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetaEditError(f"{path / WEIGHTS}: does not match a {method} editor ({e})") from None
    editor.to(next(model.parameters()).device)
    editor.eval()
    return editor
