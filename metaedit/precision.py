"""`trainer.precision: auto`: bf16 autocast only where the hardware computes bf16 natively, and on a
CPU only where it is measured to be faster for the model being trained.

Why: on a CPU with AVX512-BF16 / AMX a 256x576 @ 576x1536 matmul took 0.95 ms in bf16 against 4.9 ms
in fp32 (one thread), but on an AVX2-only CPU bf16 is emulated and was ~8x *slower* than fp32. So bf16
is worth it only where the instruction set has it, and fp32 is the safe answer everywhere else. The
flags are necessary, not sufficient: on a 2-core Xeon with AMX, MEND's training step on SmolLM2-135M
ran at 0.95 it/s under bf16 autocast against 1.15 it/s in fp32 (autocast re-casts every weight on every
forward, and a 135M model's small-batch matmuls are too short to win that back). So where the flags
allow bf16 on a CPU, a training step is timed both ways first (training.py passes one).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable
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


# bf16 must be at least this much faster to be chosen: a tie goes to fp32, the more exact one.
BF16_MIN_SPEEDUP = 1.1


def choose_by_timing(fp32_s: float, bf16_s: float) -> tuple[str, str]:
    """(precision, reason) from the measured seconds of one training step in fp32 and in bf16 autocast."""
    timing = f"one training step: fp32 {fp32_s * 1e3:.0f} ms, bf16 autocast {bf16_s * 1e3:.0f} ms"
    if bf16_s * BF16_MIN_SPEEDUP <= fp32_s:
        return "bf16-mixed", timing
    return "32-true", f"{timing}: bf16 not faster here"


def time_step(step: Callable[[], None], bf16: bool, device_type: str = "cpu", reps: int = 2) -> float:
    """Median seconds of `step()` (a forward and its backward) under bf16 autocast or in fp32; the first
    call is a warm-up (allocator, kernel selection) and is not counted."""
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            step()
        if rep:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def resolve_precision(requested: str | int | None, accelerator: str,
                      step: Callable[[], None] | None = None) -> str | int | None:
    """The precision to give the Trainer; logs the choice (and why) when `requested` is "auto".

    With `step` given (one training step's forward and backward, without the optimizer's update), a CPU
    whose flags allow bf16 gets it only when that step is measured to be faster under bf16 autocast than
    in fp32 — a whole step, because what decides is not the matmuls alone: a forward through the base
    model alone was faster in bf16 on the AMX Xeon where MEND's step was slower.
    """
    if requested != "auto":
        return requested
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    cuda_bf16 = accelerator in ("cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    precision, reason = select_precision(requested, accelerator, cuda_bf16, cpu_flags() if accelerator == "cpu" else ())
    if precision == "bf16-mixed" and accelerator == "cpu" and step is not None:
        flags_reason = reason
        precision, reason = choose_by_timing(time_step(step, bf16=False), time_step(step, bf16=True))
        reason = f"{flags_reason}; {reason}"
    capability = torch.backends.cpu.get_cpu_capability() if accelerator == "cpu" else None
    log.info("precision auto -> %s (%s%s)", precision, reason, f"; torch cpu capability {capability}" if capability else "")
    return precision
