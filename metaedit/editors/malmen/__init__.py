from metaedit.editors.malmen.editor import MALMENEditor, solve_shift

__all__ = ["MALMENEditor", "solve_shift"]
