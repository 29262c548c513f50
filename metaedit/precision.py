"""`trainer.precision: auto`: bf16 autocast only where the hardware computes bf16 natively.

Why: on a CPU with AVX512-BF16 / AMX a 256x576 @ 576x1536 matmul took 0.95 ms in bf16 against 4.9 ms
in fp32 (one thread), but on an AVX2-only CPU bf16 is emulated and was ~8x *slower* than fp32. So bf16
is worth it exactly where the instruction set has it, and fp32 is the safe answer everywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# x86 /proc/cpuinfo flags of native bf16 matmul instructions (AVX512-BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def select_precision(requested: str | int | None, accelerator: str, cuda_bf16: bool,
                     cpu_flags: Iterable[str]) -> tuple[str | int | None, str]:
    """(Lightning precision, reason) for a requested value; anything but "auto" passes through untouched.

    `accelerator` is the resolved device kind ("cpu", "cuda"/"gpu", ...). A CUDA device without bf16
    gets 32-true, not 16-mixed: fp16 overflows need a loss scaler, and the manual optimisation in
    metaedit/system.py would count those overflows as non-finite steps and abort.
    """
    if requested != "auto":
        return requested, "explicit"
    if accelerator in ("cuda", "gpu"):
        return ("bf16-mixed", "cuda supports bf16") if cuda_bf16 else ("32-true", "cuda without bf16")
    if accelerator == "cpu":
        native = sorted(BF16_CPU_FLAGS.intersection(cpu_flags))
        if native:
            return "bf16-mixed", f"cpu flags: {', '.join(native)}"
        return "32-true", "cpu has no avx512_bf16/amx_bf16 (bf16 would be emulated)"
    return "32-true", f"accelerator {accelerator!r}: bf16 speed unknown"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux x86); empty where they cannot be read (then fp32 is chosen)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (where bf16 autocast is a speed-up, not a loss)."""
    kind = device.type
    cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    precision, _ = select_precision("auto", kind, cuda_bf16, cpu_flags() if kind == "cpu" else ())
    return precision == "bf16-mixed"


def uses_bf16(choice: str, device: torch.device) -> bool:
    """Whether a "fp32" | "bf16" | "auto" choice runs bf16 autocast on `device` (auto: where native)."""
    return choice == "bf16" or (choice == "auto" and native_bf16(device))


def resolve_precision(requested: str | int | None, accelerator: str) -> str | int | None:
    """The precision to give the Trainer; logs the choice (and why) when `requested` is "auto"."""
    if requested != "auto":
        return requested
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    cuda_bf16 = accelerator in ("cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    precision, reason = select_precision(requested, accelerator, cuda_bf16, cpu_flags() if accelerator == "cpu" else ())
    capability = torch.backends.cpu.get_cpu_capability() if accelerator == "cpu" else None
    log.info("precision auto -> %s (%s%s)", precision, reason, f"; torch cpu capability {capability}" if capability else "")
    return precision
