"""Precision settings: the autocast dtype of ``precision=bf16|fp16|fp32`` and its context."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "autocast"]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)``, or a no-op for ``dtype=None``."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
