"""Editor checkpoints: editor.safetensors + editor_config.json, never base weights, never pickle."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

import metaedit
from metaedit.editors.base import Editor
from metaedit.editors.registry import editor_class
from metaedit.models.fingerprint import fingerprint
from metaedit.models.inner_params import InnerParam, resolve_inner_params
from metaedit.models.loading import load_base_model, load_tokenizer, make_formatter
from metaedit.types import MetaEditError
from metaedit.utils import atomic_dir

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "editor.safetensors", "editor_config.json"
FORMAT_VERSION = 1


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
) -> Editor:
    """Construct an editor for `model`; the model config travels with it into checkpoints."""
    cls = editor_class(method)
    inner = inner_params if inner_params is not None else resolve_inner_params(model, model_cfg.get("inner_params"))
    try:
        editor = cls(model, inner, **hparams)
    except TypeError as e:
        raise MetaEditError(f"method {method!r}: bad hyper-parameters {hparams}: {e}") from None
    editor.model_cfg = dict(model_cfg)  # type: ignore[assignment]
    if tokenizer is not None:
        editor.formatter = make_formatter(model, tokenizer, model_cfg)
    return editor


def save_editor(editor: Editor, directory: str | Path) -> Path:
    directory = Path(directory)
    config = {
        "format": FORMAT_VERSION,
        "method": editor.method,
        "metaedit_version": metaedit.__version__,
        "hparams": editor.hparams(),
        "inner_params": [asdict(p) for p in editor.inner_params],
        "base_model": {
            "config": getattr(editor, "model_cfg", {}),
            "fingerprint": fingerprint(editor.model),
        },
    }
    # contiguous() + clone(): safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in editor.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"method": editor.method})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
    return directory


def resolve_editor_dir(path: str | Path) -> Path:
    """Accept an editor directory or a training run directory (whose best editor is in `best/`)."""
    path = Path(path)
    if not path.exists():
        raise MetaEditError(f"editor directory not found: {path}")
    if not (path / CONFIG).exists() and (path / "best" / CONFIG).exists():
        path = path / "best"
    missing = [f for f in (CONFIG, WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise MetaEditError(f"incomplete editor directory {path}: missing {', '.join(missing)}")
    return path


def editor_digest(path: str | Path) -> str:
    """A content hash of a saved editor (its weights and config): tells whether a saved evaluation
    was made with the checkpoint that is there now."""
    path = resolve_editor_dir(path)
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update((path / name).read_bytes())
    return h.hexdigest()[:16]


def load_editor(
    path: str | Path,
    model: PreTrainedModel | None = None,
    *,
    tokenizer: Any | None = None,
    force: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> Editor:
    """Load a saved editor onto `model`, or onto the base model its checkpoint names (built or
    converted models are looked up in `cache_dir`, default $METAEDIT_CACHE or ~/.cache/metaedit)."""
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
    editor = build_editor(method, model, model_cfg, config["hparams"], tokenizer=tokenizer, inner_params=inner)
    state = load_file(str(path / WEIGHTS))
    try:
        editor.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MetaEditError(f"{path / WEIGHTS}: does not match a {method} editor ({e})") from None
    editor.to(next(model.parameters()).device)
    editor.eval()
    return editor
