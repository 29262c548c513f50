from metaedit.editors.enn.editor import ENNEditor

__all__ = ["ENNEditor"]
