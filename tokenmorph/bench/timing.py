"""Timing helpers of the benchmarks: median wall times, the same-run matrix-product peak, and a
wrapper that adds a callable's time to a phase."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["timeit", "matmul_peak", "Timed"]


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
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 2048, repeats: int = 5
) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) product at ``dtype``: the same-run reference
    peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def mm():
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t = timeit(mm, repeats, warmup=2)
    return 2 * n**3 / t["min_s"]


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
