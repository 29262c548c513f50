from metaedit.editors.alphaedit.editor import AlphaEditEditor

__all__ = ["AlphaEditEditor"]
