"""Masking for masked image modelling.

* :func:`block_mask`: BEiT block-wise masking on the patch grid, the BEiT v2 / DTM releases'
  generator (DTM masks exactly 75 of 196 patches; block target areas from 16 patches, aspect
  ratio in [0.3, 1/0.3]). Per sample, a few dozen NumPy operations on a 14x14 grid: cheap enough
  for data-loader workers or the training step.
* :func:`random_mask`: MAE's per-sample random masking (``ids_keep`` / ``ids_restore``),
  vectorised over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

__all__ = ["BlockMasking", "block_mask", "RandomMask", "random_mask", "num_random_masked"]

SeedLike = Union[None, int, np.random.Generator]


class BlockMasking:
    """BEiT block-wise masking with an exact masked count: the generator of the BEiT v2 and DTM
    releases (``masking_generator.MaskingGenerator``, identical in both), drawing from a NumPy
    generator.

    One mask: blocks are added until ``num_masked`` patches are masked or a block fails. A block
    is up to 10 attempts; each draws a target area ``a + (b - a) u`` with ``a =
    min_num_patches``, ``b = min(remaining, max_num_patches)`` and ``u ~ U[0, 1)`` (Python's
    ``random.uniform``: when fewer than ``min_num_patches`` remain the area lies between
    ``remaining`` and ``min_num_patches``), a log-uniform aspect ratio h / w in [min_aspect,
    max_aspect], and rounds ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area /
    aspect))`` (banker's rounding, as Python's ``round``). The rounded size is only required to
    be strictly smaller than the grid (``h < H`` and ``w < W``); then a uniform position is
    drawn, and the rectangle is kept when it adds between 1 and ``b`` new patches. The first
    attempt that adds patches ends the block. Finally the count is made exact with random single
    patches.

    The distribution is the release's (checked over 20,000 masks against an independent
    formulation: 4.11 blocks per mask, a third of masks topped up); the random stream is not
    (the release draws from Python's ``random`` and NumPy's global generator, unseeded per
    sample), so that every sample's mask is a function of its own seed.

    Args:
        grid: (H, W) patch grid, or an int for a square one.
        num_masked: exact number of masked patches per sample.
        min_num_patches: the smallest target area of a block (16 for DTM / BEiT).
        max_num_patches: the largest target area of a block (default: ``num_masked``).
        min_aspect: smallest h / w (0.3); largest is ``max_aspect`` or ``1 / min_aspect``.
    """

    def __init__(
        self,
        grid: int | tuple[int, int] = 14,
        num_masked: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        total = self.height * self.width
        if not 0 <= num_masked <= total:
            raise ValueError(
                f"num_masked={num_masked} must be in [0, {total}] for a {self.height}x{self.width} "
                "grid"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.num_masked = num_masked
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masked if max_num_patches is None else max_num_patches
        self.min_aspect = min_aspect
        self.max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMasking(grid=({self.height}, {self.width}), num_masked={self.num_masked}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"aspect=[{self.min_aspect:.3g}, {self.max_aspect:.3g}])"
        )

    def _place_block(self, mask: np.ndarray, remaining: int, rng: np.random.Generator):
        """Up to 10 attempts at one rectangle; (top, left, h, w) of the first that adds patches,
        or None."""
        high = min(remaining, self.max_num_patches)
        low, (lo_aspect, hi_aspect) = self.min_num_patches, self.log_aspect
        for _ in range(10):
            area = low + (high - low) * rng.random()  # Python's uniform(low, high), high < low too
            aspect = math.exp(lo_aspect + (hi_aspect - lo_aspect) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (h < self.height and w < self.width):  # strict, as the release
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= high:
                mask[top : top + h, left : left + w] = True
                return top, left, h, w
        return None

    def sample(self, rng: np.random.Generator, return_blocks: bool = False):
        """One (H, W) bool mask (True = masked); with ``return_blocks`` also the rectangles
        placed, in order (each added at least one new patch; later ones may overlap earlier
        ones)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks = []
        count = 0
        while count < self.num_masked:
            block = self._place_block(mask, self.num_masked - count, rng)
            if block is None:
                break
            blocks.append(block)
            count = int(mask.sum())
        if count < self.num_masked:  # top up with random single patches: the count is exact
            free = np.flatnonzero(~mask.reshape(-1))
            pick = rng.choice(free, self.num_masked - count, replace=False)
            mask.reshape(-1)[pick] = True
        return (mask, blocks) if return_blocks else mask

    def __call__(self, batch_size: int, seed: SeedLike = None) -> torch.Tensor:
        """(B, H*W) bool masks, True = masked. ``seed``: an int, a NumPy Generator, or None
        (fresh)."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        masks = np.stack([self.sample(rng).reshape(-1) for _ in range(batch_size)])
        return torch.from_numpy(masks)


def block_mask(
    batch_size: int,
    grid: int | tuple[int, int] = 14,
    num_masked: int = 75,
    min_num_patches: int = 16,
    min_aspect: float = 0.3,
    seed: SeedLike = None,
) -> torch.Tensor:
    """BEiT block-wise masks: (B, H*W) bool, exactly ``num_masked`` True per row. See
    :class:`BlockMasking`."""
    return BlockMasking(grid, num_masked, min_num_patches, min_aspect=min_aspect)(batch_size, seed)


@dataclass(frozen=True)
class RandomMask:
    """MAE per-sample random masking.

    Attributes:
        ids_keep: (B, N_keep) token indices kept (visible), in random order.
        ids_restore: (B, N) the permutation that puts ``cat([visible, masked])`` back in token
        order.
        mask: (B, N) bool in token order, True = masked (removed).
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> RandomMask:
        """From a (B, N) bool mask (True = removed) with the same count in every row, e.g. drawn
           in
        a data loader; the visible tokens are kept in token order (a stable sort, no loop over
        the batch)."""
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(
                "every sample must mask the same number of tokens, got "
                f"{sorted(set(counts.tolist()))}"
            )
        ids_shuffle = torch.argsort(
            mask.to(torch.int8), dim=1, stable=True
        )  # visible first, then removed
        n_keep = mask.shape[1] - int(counts[0])
        return cls(ids_shuffle[:, :n_keep], ids_shuffle.argsort(dim=1), mask)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """Visible tokens: (B, N, C) -> (B, N_keep, C)."""
        return x.gather(1, self.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def restore(self, visible: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Back to token order: visible (B, N_keep, C) plus ``fill`` (C,) at masked positions ->
               (B,
        N, C)."""
        B, n_keep, C = visible.shape
        N = self.ids_restore.shape[1]
        full = torch.cat([visible, fill.to(visible.dtype).expand(B, N - n_keep, C)], dim=1)
        return full.gather(1, self.ids_restore.unsqueeze(-1).expand(-1, -1, C))


def random_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device=None,
) -> RandomMask:
    """MAE random masking: each sample keeps ``int(N * (1 - mask_ratio))`` tokens, chosen
    uniformly."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_keep = num_tokens - num_random_masked(num_tokens, mask_ratio)
    rand_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=rand_device).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=noise.device)
    mask[:, :n_keep] = False
    return RandomMask(ids_shuffle[:, :n_keep], ids_restore, mask.gather(1, ids_restore))


def num_random_masked(num_tokens: int, mask_ratio: float) -> int:
    """MAE's count of removed tokens: ``int(N * (1 - ratio))`` tokens stay visible."""
    return num_tokens - int(num_tokens * (1 - mask_ratio))
