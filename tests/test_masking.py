"""Masking: exact counts, block geometry, determinism, MAE ids_keep / ids_restore."""

import numpy as np
import pytest
import torch

from tokenmorph.masking import BlockMasking, block_mask, random_mask


def test_block_mask_exact_count_and_seeded():
    m = block_mask(64, grid=14, num_masked=75, seed=0)
    assert m.shape == (64, 196) and m.dtype == torch.bool
    assert torch.all(m.sum(1) == 75)
    assert torch.equal(m, block_mask(64, seed=0))
    assert not torch.equal(m, block_mask(64, seed=1))
    assert len({tuple(row.tolist()) for row in m}) == 64  # per-sample masks differ


@pytest.mark.parametrize("num_masked", [0, 1, 15, 75, 98, 150, 196])
def test_block_mask_counts_edge_cases(num_masked):
    assert torch.all(block_mask(8, num_masked=num_masked, seed=2).sum(1) == num_masked)


def test_blocks_respect_min_size_and_aspect():
    gen = BlockMasking(14, 75, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(0)
    total_blocks, block_covered = 0, 0
    for _ in range(200):
        mask, blocks = gen.sample(rng, return_blocks=True)
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert h * w >= 16
            assert 0.3 - 1e-9 <= h / w <= 1 / 0.3 + 1e-9
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            union[top : top + h, left : left + w] = True
        assert np.all(mask[union])  # blocks are masked
        total_blocks += len(blocks)
        block_covered += union.sum()
        assert mask.sum() == 75
    # almost all masked patches come from blocks, not from the random top-up
    assert block_covered / (200 * 75) > 0.9 and total_blocks > 200


def test_block_masking_rejects_bad_values():
    with pytest.raises(ValueError, match="num_masked=200"):
        BlockMasking(14, 200)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMasking(14, 75, min_aspect=2.0)


def test_random_mask_statistics_and_restore():
    g = torch.Generator().manual_seed(0)
    rm = random_mask(32, 196, 0.75, generator=g)
    n_keep = int(196 * 0.25)
    assert rm.ids_keep.shape == (32, n_keep) and torch.all(rm.mask.sum(1) == 196 - n_keep)
    # kept ids are exactly the unmasked positions
    for b in range(32):
        assert set(rm.ids_keep[b].tolist()) == set(torch.nonzero(~rm.mask[b]).flatten().tolist())
    # restore puts visible tokens back where they came from, fill elsewhere
    x = torch.arange(32 * 196, dtype=torch.float32).view(32, 196, 1)
    fill = torch.tensor([-1.0])
    back = rm.restore(rm.keep(x), fill)
    assert torch.equal(back[~rm.mask], x[~rm.mask]) and torch.all(back[rm.mask] == -1)
    # seeded
    rm2 = random_mask(32, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rm.ids_keep, rm2.ids_keep)
    # uniform over positions: each position masked ~75% of the time
    freq = random_mask(4000, 49, 0.75, generator=g).mask.float().mean(0)
    assert float((freq - 37 / 49).abs().max()) < 0.04


def test_random_mask_rejects_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 10, 1.0)
