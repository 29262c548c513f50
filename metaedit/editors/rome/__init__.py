from metaedit.editors.rome.editor import ROMEEditor

__all__ = ["ROMEEditor"]
