"""Batching that tolerates skipped (undecodable) samples, and seeded subsets of data sets."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["collate_skip", "seeded_subset"]


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``DataLoader`` collate_fn that drops skipped (``None``) items.

    ``batch``: items ``(image (3, H, W) tensor, label)`` or ``None``; a label is an int or a
    tensor (a segmentation mask (H, W)). Returns ``(images (B, 3, H, W), labels (B,) int64 or
    (B, ...) stacked, num_skipped)``; when every item was skipped, ``images`` has shape (0,).
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in kept])
    if torch.is_tensor(kept[0][1]):
        return images, torch.stack([label for _, label in kept]), skipped
    labels = torch.tensor([int(label) for _, label in kept], dtype=torch.long)
    return images, labels, skipped


def seeded_subset(dataset: Dataset, limit: int | None, generator: torch.Generator) -> Dataset:
    """A random subset of ``limit`` items drawn with ``generator``, kept in data set order
       (random,
    not the first N: those of a class-sorted tree would be a few classes only); the whole data
    set when ``limit`` is None or not smaller."""
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=generator)[:limit]
    return Subset(dataset, order.sort().values.tolist())
