"""Default locations outside Hydra (load_editor from Python); configs/paths owns them inside Hydra."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("METAEDIT_CACHE", Path.home() / ".cache" / "metaedit"))
