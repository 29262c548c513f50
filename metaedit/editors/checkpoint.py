"""Writing editor checkpoints: editor.safetensors + editor_config.json, never base weights, never
pickle. Kept apart from `io.py` (which knows every method) so the base class can save itself
without importing the registry of all editors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import metaedit
from metaedit.models.fingerprint import fingerprint
from metaedit.types import MetaEditError
from metaedit.utils import atomic_dir, save_tensors

if TYPE_CHECKING:
    from metaedit.editors.base import Editor

WEIGHTS, CONFIG = "editor.safetensors", "editor_config.json"
FORMAT_VERSION = 1


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
        save_tensors(tensors, tmp / WEIGHTS, metadata={"method": editor.method})
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
