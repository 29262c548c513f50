"""Explicit method registry: name -> editor class. No string-built imports."""

from __future__ import annotations

from metaedit.editors.alphaedit import AlphaEditEditor
from metaedit.editors.base import Editor
from metaedit.editors.enn import ENNEditor
from metaedit.editors.ft import FTEditor, FTLEditor
from metaedit.editors.ke import KEConstrainedEditor, KEEditor
from metaedit.editors.malmen import MALMENEditor
from metaedit.editors.memit import MEMITEditor
from metaedit.editors.mend import MENDEditor
from metaedit.editors.rome import ROMEEditor
from metaedit.editors.serac import SERACEditor
from metaedit.types import MetaEditError

EDITORS: dict[str, type[Editor]] = {
    FTEditor.method: FTEditor,
    FTLEditor.method: FTLEditor,
    MENDEditor.method: MENDEditor,
    MALMENEditor.method: MALMENEditor,
    SERACEditor.method: SERACEditor,
    ENNEditor.method: ENNEditor,
    KEEditor.method: KEEditor,
    KEConstrainedEditor.method: KEConstrainedEditor,
    ROMEEditor.method: ROMEEditor,
    MEMITEditor.method: MEMITEditor,
    AlphaEditEditor.method: AlphaEditEditor,
}


def editor_class(method: str) -> type[Editor]:
    if method not in EDITORS:
        raise MetaEditError(f"unknown method {method!r}; valid: {sorted(EDITORS)}")
    return EDITORS[method]
