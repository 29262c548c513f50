"""metaedit: meta-trained model editors."""

__version__ = "0.1.0"

from metaedit.types import EditRequest, MetaEditError  # noqa: E402


def load_editor(path, model=None, *, force: bool = False, device=None):  # type: ignore[no-untyped-def]
    """Load a saved editor; see `metaedit.editors.io.load_editor`."""
    from metaedit.editors.io import load_editor as _load

    return _load(path, model=model, force=force, device=device)


__all__ = ["EditRequest", "MetaEditError", "load_editor", "__version__"]
