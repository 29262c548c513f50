from metaedit.editors.serac.edited import SERACEditedModel
from metaedit.editors.serac.editor import SERACEditor
from metaedit.editors.serac.memory import EditMemory

__all__ = ["EditMemory", "SERACEditedModel", "SERACEditor"]
