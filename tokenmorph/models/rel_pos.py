"""BEiT's relative position bias with a faster gradient.

timm's BEiT layers read their bias as ``table[index]`` (advanced indexing); its gradient, a
scatter-add of the (N*N, heads) bias gradient into the (T, heads) table, runs on a CPU as
``index_put_(accumulate=True)``: ~1.8 ms a table at 224 px (38,809 entries; 13 tables a ViT-S
step). :func:`gather_rows` computes it with ``index_add_``, which adds in index order (~0.2 ms):
the same gradient, bit for bit, as timm's for these layers (``tests/test_fast_paths.py``), and
an order that does not depend on the kernel's threading (``index_put_`` on a contiguous
gradient of that size does not add in a fixed order on this project's CPU). The forward is
unchanged.

:func:`use_deterministic_rel_pos` switches every BEiT attention layer and shared bias of a model
to it (the student at construction, any model the training engine runs).
"""

from __future__ import annotations

import torch
from timm.models import beit
from torch import nn

__all__ = ["gather_rows", "use_deterministic_rel_pos"]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_table = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return grad_table.index_add_(0, index, grad), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for table (T, H) and index (M,) long -> (M, H); the table's gradient is
    summed in index order (deterministic on a CPU) instead of by ``index_put_``."""
    return _GatherRows.apply(table, index)


def _bias(table: torch.Tensor, index: torch.Tensor, tokens: int) -> torch.Tensor:
    """table (T, H), index (tokens * tokens,) -> bias (H, tokens, tokens), as timm lays it out."""
    return gather_rows(table, index.view(-1)).view(tokens, tokens, -1).permute(2, 0, 1).contiguous()


class _Attention(beit.Attention):
    """timm's BEiT attention whose per-block bias is read through :func:`gather_rows`."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        tokens = self.window_size[0] * self.window_size[1] + 1
        return _bias(self.relative_position_bias_table, self.relative_position_index, tokens)[None]


class _SharedBias(beit.RelativePositionBias):
    """timm's shared BEiT bias read through :func:`gather_rows`."""

    def forward(self) -> torch.Tensor:
        tokens = self.window_area + 1
        return _bias(self.relative_position_bias_table, self.relative_position_index, tokens)


_OURS = {beit.Attention: _Attention, beit.RelativePositionBias: _SharedBias}
_TIMMS = {ours: theirs for theirs, ours in _OURS.items()}


def use_deterministic_rel_pos(model: nn.Module, enabled: bool = True) -> int:
    """Read every relative position table of ``model``'s timm BEiT layers through
    :func:`gather_rows` (same forward values, the gradient summed in index order), or with
    ``enabled=False`` through timm's own indexing again (the release's work, for the benchmark's
    baseline); returns how many tables. Idempotent; the state dict is unchanged."""
    n = 0
    for m in model.modules():
        # exact types: a subclass of timm's layers may read its bias otherwise
        cls = type(m)
        if cls in _OURS or cls in _TIMMS:
            if getattr(m, "relative_position_bias_table", None) is None:
                continue  # a block without its own table (the shared one serves it)
            m.__class__ = (_OURS.get(cls, cls)) if enabled else _TIMMS.get(cls, cls)
            n += 1
    return n
