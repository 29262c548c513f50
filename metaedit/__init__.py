"""metaedit: meta-trained model editors."""

from typing import Any

__version__ = "0.1.0"

from metaedit.types import EditRequest, MetaEditError  # noqa: E402


def load_editor(path: Any, model: Any = None, **kwargs: Any) -> Any:
    """Load a saved editor (see `metaedit.editors.io.load_editor` for the keyword arguments)."""
    from metaedit.editors.io import load_editor as _load

    return _load(path, model=model, **kwargs)


__all__ = ["EditRequest", "MetaEditError", "load_editor", "__version__"]
