"""Precision settings: the autocast dtype of ``precision=bf16|fp16|fp32``, its context, and the
warning for bf16 on a GPU without bf16 tensor cores."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["PRECISIONS", "autocast_dtype", "autocast", "bf16_warning"]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)``, or a no-op for ``dtype=None``."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def bf16_warning(precision: str, device: torch.device) -> str | None:
    """One warning line when ``precision=bf16`` runs on a CUDA GPU older than Ampere (compute
    capability < 8.0: V100, T4, ...), which has no bf16 tensor cores: torch emulates bf16
    there, several times slower than fp16. None otherwise."""
    if precision != "bf16" or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    name = torch.cuda.get_device_name(device)
    return (
        f"warning: precision=bf16 on {name} (compute capability {major}.{minor}, before Ampere) "
        "is emulated without bf16 tensor cores, several times slower; use precision=fp16 on "
        "this GPU (a GradScaler keeps it stable)"
    )
