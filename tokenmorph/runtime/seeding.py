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


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
