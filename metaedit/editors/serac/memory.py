"""SERAC's edit memory: the edits as text plus their cached classifier embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from metaedit.types import EditRequest, MetaEditError
from metaedit.utils import atomic_dir, save_tensors

MEMORY_TEXTS, MEMORY_KEYS = "memory.json", "memory.safetensors"


def edit_text(request: EditRequest) -> str:
    """How an edit z is shown to the scope classifier (DESIGN §2: "x_e : y_e")."""
    return f"{request.prompt} : {request.target}"


@dataclass
class EditMemory:
    """`requests[i]` and `keys[i]` (its unit-norm classifier embedding; None in cross mode) belong
    together. Keys are computed once when an edit is added, so answering a batch costs one
    [batch, memory] similarity, whatever the memory size."""

    requests: list[EditRequest] = field(default_factory=list)
    keys: Tensor | None = None
    classifier_id: str = ""  # which classifier weights made `keys` (stale keys are recomputed on load)

    def __len__(self) -> int:
        return len(self.requests)

    def extend(self, requests: list[EditRequest], keys: Tensor | None) -> None:
        self.requests = self.requests + list(requests)
        if keys is not None:
            self.keys = keys if self.keys is None or len(self.keys) == 0 else torch.cat([self.keys, keys])

    def clear(self) -> None:
        self.requests, self.keys = [], None

    def detached(self) -> EditMemory:
        return EditMemory(list(self.requests), None if self.keys is None else self.keys.detach(), self.classifier_id)

    def save(self, directory: str | Path) -> Path:
        """memory.json (edit texts) + memory.safetensors (keys); written atomically, no pickle."""
        directory = Path(directory)
        meta = {"classifier_id": self.classifier_id, "requests": [[r.prompt, r.target] for r in self.requests]}
        with atomic_dir(directory) as tmp:
            (tmp / MEMORY_TEXTS).write_text(json.dumps(meta, indent=1))
            keys = {} if self.keys is None else {"keys": self.keys.detach().to("cpu").contiguous().clone()}
            save_tensors(keys, tmp / MEMORY_KEYS)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EditMemory:
        directory = Path(directory)
        missing = [f for f in (MEMORY_TEXTS, MEMORY_KEYS) if not (directory / f).is_file()]
        if missing:
            raise MetaEditError(f"edit memory {directory}: missing {', '.join(missing)}")
        try:
            meta = json.loads((directory / MEMORY_TEXTS).read_text())
            requests = [EditRequest(p, t) for p, t in meta["requests"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise MetaEditError(f"{directory / MEMORY_TEXTS}: unreadable edit memory ({e!r})") from None
        keys = load_file(str(directory / MEMORY_KEYS)).get("keys")
        if keys is not None and len(keys) != len(requests):
            raise MetaEditError(f"edit memory {directory}: {len(requests)} edits but {len(keys)} keys")
        return cls(requests, keys, meta.get("classifier_id", ""))
