"""Value shifts δ of requests on the unedited model, kept on disk.

A value shift is most of a locate-then-edit edit's time (some twenty forward+backward passes), and
it depends only on the base weights, the layer, the value settings, the contexts and the request:
MEMIT and AlphaEdit with the same layers compute the same δ for a batch, and a batch of 1000 that
dies at edit 900 would otherwise start again from zero. Shifts made inside a sequence of edits
(on a model already edited) are never cached.

Layout: <cache_dir>/values/<scope digest>/scope.json (what the digest stands for) and one
<request digest>.safetensors per request, each written atomically (temporary file, then rename).

Several processes on one machine editing the same batch share the work: a process claims a request
(<request digest>.claim holding its pid, created exclusively) before optimising it, the others skip
it and collect its δ when it appears; a claim whose process has died is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from metaedit.types import EditRequest
from metaedit.utils import save_tensors

VALUES_FORMAT = 1


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ValueCache:
    """δ per request for one scope: everything besides the request that determines δ (base
    fingerprint, layer, value settings, contexts, fact token...)."""

    def __init__(self, cache_dir: str | Path, scope: Mapping[str, Any]) -> None:
        self.scope = {"format": VALUES_FORMAT, **scope}
        self.dir = Path(cache_dir) / "values" / _digest(self.scope)

    @staticmethod
    def request_key(request: EditRequest) -> str:
        return _digest({"prompt": request.prompt, "subject": request.subject, "target": request.target})

    def _path(self, request: EditRequest) -> Path:
        return self.dir / f"{self.request_key(request)}.safetensors"

    def get(self, request: EditRequest, device: torch.device) -> Tensor | None:
        path = self._path(request)
        if not path.is_file():
            return None
        return load_file(str(path))["delta"].to(device)

    def put(self, request: EditRequest, delta: Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        scope = self.dir / "scope.json"
        if not scope.is_file():
            tmp = scope.with_name(f".scope.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.scope, indent=1, default=str))
            os.replace(tmp, scope)
        path = self._path(request)
        save_tensors({"delta": delta.detach().float().cpu().contiguous()}, path,  # a reader sees all or none
                     metadata={"prompt": request.prompt, "target": request.target})

    def _claim_path(self, request: EditRequest) -> Path:
        return self.dir / f"{self.request_key(request)}.claim"

    def claim(self, request: EditRequest) -> bool:
        """Take `request` for this process; False while another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._claim_path(request)
        for _ in range(2):  # a second try after removing a dead process's claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _holder_alive(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, request: EditRequest) -> None:
        self._claim_path(request).unlink(missing_ok=True)

    def shared(self, requests: Sequence[EditRequest], compute: Callable[[EditRequest], Tensor],
               device: torch.device, on_done: Callable[[int], None] | None = None, poll_s: float = 2.0) -> list[Tensor]:
        """δ of every request: read when cached, else claimed and computed (`compute`), and those other
        processes hold collected once they appear. `on_done(k)` after each of the k shifts is in hand."""
        out: list[Tensor | None] = [None] * len(requests)
        done = 0
        while done < len(requests):
            waiting = False
            for i, q in enumerate(requests):
                if out[i] is not None:
                    continue
                d = self.get(q, device)
                if d is None and self.claim(q):
                    try:
                        d = self.get(q, device)  # finished by another process between the two looks
                        if d is None:
                            d = compute(q)
                            self.put(q, d)
                    finally:
                        self.release(q)
                if d is None:
                    waiting = True
                    continue
                out[i] = d
                done += 1
                if on_done is not None:
                    on_done(done)
            if waiting and done < len(requests):
                time.sleep(poll_s)
        return [d for d in out if d is not None]


def _holder_alive(claim: Path) -> bool:
    """Whether the process named in a claim file still runs (this machine's pids)."""
    try:
        pid = int(claim.read_text().strip() or 0)
    except (OSError, ValueError):
        return True  # being written right now: treat as held
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
