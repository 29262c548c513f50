from metaedit.editors.ft.editor import FTEditor, FTLEditor

__all__ = ["FTEditor", "FTLEditor"]
