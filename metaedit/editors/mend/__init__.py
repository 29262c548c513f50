from metaedit.editors.mend.editor import MENDEditor

__all__ = ["MENDEditor"]
