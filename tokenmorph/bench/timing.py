"""Timing helpers of the benchmarks: median wall times, the same-run matrix-product peak, the
data-sheet peak of common GPUs, and a wrapper that adds a callable's time to a phase."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["timeit", "matmul_peak", "spec_peak", "SPEC_PEAKS_16BIT", "Timed"]


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and min wall time (seconds) of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def matmul_peak(
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    n: int | None = None,
    repeats: int | None = None,
) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) product at ``dtype``: the same-run reference
    peak. On CUDA: n = 8192 (a 2048^3 product lasts tens of microseconds, so launch and sync
    overhead would lower the "peak" to half of what the GPU does), timed with CUDA events over
    ``repeats`` (default 20) back-to-back products, the best of 3 such runs. On the CPU: n =
    2048, the best wall time of ``repeats`` (default 5) products."""
    if torch.device(device).type != "cuda":
        n = n or 2048
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = timeit(lambda: a @ b, repeats or 5, warmup=2)
        return 2 * n**3 / t["min_s"]
    n, repeats = n or 8192, repeats or 20
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty_like(a)
    for _ in range(3):  # warm-up: kernel choice, clocks
        torch.matmul(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeats)  # elapsed_time is in ms
    return 2 * n**3 / best


# Dense (no sparsity) bf16 / fp16 tensor-core peaks of common GPUs from NVIDIA's data sheets, in
# FLOP/s, by a substring of torch.cuda.get_device_name(); the first match counts (so "H100 PCIe"
# before "H100"). fp32 has none here: its peak depends on TF32 being allowed.
SPEC_PEAKS_16BIT = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),  # fp16 only: no bf16 tensor cores
    ("T4", 65e12),  # fp16 only
)


def spec_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet dense peak (FLOP/s) of a GPU at a 16-bit ``dtype``, None when unknown (or
    fp32, or bf16 on a GPU without bf16 tensor cores)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key, peak in SPEC_PEAKS_16BIT:
        if key in device_name:
            if dtype == torch.bfloat16 and key in ("V100", "T4"):
                return None
            return peak
    return None


class Timed:
    """Wraps a callable and adds its wall time (device-synchronised) to ``phases[phase]``; every
    other attribute is the wrapped object's (a teacher's ``name``, ``dim``, ...)."""

    def __init__(self, fn: Callable, phase: str, phases: dict, sync: Callable) -> None:
        self._fn, self._phase, self._phases, self._sync = fn, phase, phases, sync

    def __getattr__(self, name: str):
        return getattr(self._fn, name)

    def __call__(self, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self._fn(*args, **kwargs)
        self._sync()
        self._phases[self._phase] = self._phases.get(self._phase, 0.0) + time.perf_counter() - t0
        return out
