"""Which kernel timm's attention layers run: torch's fused ``scaled_dot_product_attention``
(SDPA) or the explicit ``softmax(q k^T * scale + bias) v``.

Every timm attention layer (ViT, BEiT, CLIP) has a ``fused_attn`` switch; both paths compute
the same function. On CUDA SDPA picks flash or memory-efficient kernels (the BEiT student's
relative position bias is an additive mask, which rules out flash attention but not the
memory-efficient kernel). On a CPU torch's bf16 SDPA with a bias falls back to a math path that
copies q, k, v and checks the mask; the explicit product is 1.2-1.4x faster for a block's
forward + backward at every training shape measured (the demo's 65 tokens, ViT-S and ViT-B at
224 px) and equal for inference; in fp32 neither wins everywhere.
``tokenmorph bench pretrain`` times both at the benchmarked shape and reports them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATTENTION_KERNELS", "resolve_attention", "set_attention", "attention_kernel_of"]

ATTENTION_KERNELS = ("auto", "sdpa", "explicit")


def resolve_attention(kernel: str, device_type: str, amp_dtype: torch.dtype | None) -> str:
    """``"sdpa"`` or ``"explicit"`` for a setting on a device: ``auto`` is SDPA on CUDA and
    under fp32 on a CPU, explicit under bf16 / fp16 autocast on a CPU (see the module
    docstring). A rule of the device and precision, not a timing: a resumed run on the same
    kind of device runs the same kernel, so its float rounding is the same."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    return "sdpa" if device_type == "cuda" or amp_dtype is None else "explicit"


def set_attention(module: nn.Module, kernel: str) -> int:
    """Switch every timm attention layer in ``module`` to ``kernel`` (``"sdpa"`` or
    ``"explicit"``); returns how many layers were switched."""
    if kernel not in ("sdpa", "explicit"):
        raise ValueError(f"kernel must be 'sdpa' or 'explicit', got {kernel!r}")
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    for m in layers:
        m.fused_attn = kernel == "sdpa"
    return len(layers)


def attention_kernel_of(module: nn.Module) -> str | None:
    """The kernel ``module``'s timm attention layers run (``"sdpa"``, ``"explicit"``,
    ``"mixed"``), None when it has none."""
    kinds = {m.fused_attn for m in module.modules() if hasattr(m, "fused_attn")}
    if not kinds:
        return None
    return "mixed" if len(kinds) > 1 else ("sdpa" if kinds.pop() else "explicit")
