"""Shared behaviour of the command-line entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from metaedit.types import MetaEditError


def run_or_exit(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """Run `fn(cfg)`; a user error prints one clear line and exits with status 2 (no traceback)."""
    try:
        return fn(cfg)
    except MetaEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
