from metaedit.editors.ke.editor import KEConstrainedEditor, KEEditor

__all__ = ["KEConstrainedEditor", "KEEditor"]
