"""Seeds: one well-mixed seed from several integers, and seeding every RNG a step or a sample
       draws
from."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["mix_seed", "seed_all"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (NumPy's SeedSequence: well mixed, platform
    independent)."""
    return int(
        np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[
            0
        ]
        >> 1
    )


def seed_all(seed: int, accelerators: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global generators. ``accelerators=False`` seeds
    torch's CPU generator only (the same CPU stream as ``torch.manual_seed``): what a data
    loader's per-sample seeding needs, without torch's lazy seeding of CUDA and the other
    device generators (a recorded call stack each: a quarter of a millisecond per sample)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
