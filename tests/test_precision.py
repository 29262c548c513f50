"""trainer.precision=auto: bf16-mixed only where the device computes bf16 natively (and, on a CPU, where it
is measured to be faster for the model), else 32-true."""

from __future__ import annotations

import logging

import pytest
import torch

from metaedit import precision as precision_mod
from metaedit.precision import choose_by_timing, cpu_flags, resolve_precision, select_precision

AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    "accelerator,cuda_bf16,flags,expected",
    [
        ("cpu", False, AVX2, "32-true"),  # bf16 emulated on AVX2: ~8x slower than fp32
        ("cpu", False, AVX2 | {"avx512f", "avx512_bf16"}, "bf16-mixed"),
        ("cpu", False, AVX2 | {"amx_tile", "amx_bf16"}, "bf16-mixed"),
        ("cpu", False, set(), "32-true"),  # flags unreadable
        ("cuda", True, set(), "bf16-mixed"),
        ("gpu", True, set(), "bf16-mixed"),
        ("cuda", False, AVX2 | {"avx512_bf16"}, "32-true"),  # the host CPU's flags do not matter on a GPU
        ("mps", False, {"avx512_bf16"}, "32-true"),
    ],
)
def test_auto_picks_bf16_only_with_native_support(accelerator, cuda_bf16, flags, expected):
    precision, reason = select_precision("auto", accelerator, cuda_bf16, flags)
    assert precision == expected and reason


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", 32, None])
def test_explicit_precision_passes_through(explicit):
    assert select_precision(explicit, "cpu", False, {"avx512_bf16"})[0] == explicit
    assert select_precision(explicit, "cuda", True, set())[0] == explicit
    assert resolve_precision(explicit, "cpu") == explicit


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolution_is_logged_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="metaedit.precision"):
        precision = resolve_precision("auto", "cpu")
    assert precision in ("bf16-mixed", "32-true")
    assert f"precision auto -> {precision} (" in caplog.text


@pytest.mark.parametrize("fp32_s,bf16_s,expected", [
    (1.0, 0.5, "bf16-mixed"),   # native bf16 that pays off
    (1.0, 1.2, "32-true"),      # the AMX Xeon's SmolLM2 step: autocast slower than fp32
    (1.0, 0.95, "32-true"),     # a tie goes to the more exact fp32
])
def test_measured_choice_needs_a_real_speedup(fp32_s, bf16_s, expected):
    precision, reason = choose_by_timing(fp32_s, bf16_s)
    assert precision == expected and "ms" in reason


def test_a_cpu_with_bf16_flags_times_a_step_before_choosing(monkeypatch, caplog):
    """With the flags present and a step given, the choice is the measured one (the step is run under
    bf16 autocast and without it), logged with its timings; without the flags no step is run."""
    dtypes: list[torch.dtype] = []
    weight = torch.randn(64, 64, requires_grad=True)

    def step() -> None:
        out = torch.randn(8, 64) @ weight
        dtypes.append(out.dtype)
        out.float().sum().backward()

    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with caplog.at_level(logging.INFO, logger="metaedit.precision"):
        chosen = resolve_precision("auto", "cpu", step=step)
    assert chosen in ("bf16-mixed", "32-true")
    assert set(dtypes) == {torch.float32, torch.bfloat16}
    assert "avx512_bf16; one training step: fp32" in caplog.text
    dtypes.clear()
    caplog.clear()
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.INFO, logger="metaedit.precision"):
        assert resolve_precision("auto", "cpu", step=step) == "32-true"
    assert not dtypes and "training step" not in caplog.text
