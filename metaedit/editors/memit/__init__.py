from metaedit.editors.memit.editor import MEMITEditor

__all__ = ["MEMITEditor"]
