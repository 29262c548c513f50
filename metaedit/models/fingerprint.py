"""A cheap, dtype-robust fingerprint of a model's weights (to refuse editors for another base)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


@torch.no_grad()
def fingerprint(model: nn.Module, samples: int = 64) -> str:
    """Hash names, shapes and a strided sample of every tensor's values.

    Hashing every weight of an 11B model would take minutes; a strided sample of each tensor
    catches a different checkpoint with certainty in practice. Values are rounded through bfloat16
    so the same weights loaded in float32, bfloat16 or on another device agree.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not torch.is_floating_point(p):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
