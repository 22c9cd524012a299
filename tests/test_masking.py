"""Masking: exact counts, block geometry, determinism, MAE ids_keep / ids_restore."""

import math
import random

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


def test_blocks_follow_the_release_geometry():
    """The release's rule (replacing the old test of a 16-patch floor and an aspect check on the
    rounded block, which the release does not have): a rounded block is only required to be
    strictly smaller than the grid, it lies inside it, adds at least one patch, and small blocks
    (under 16 patches) do occur."""
    gen = BlockMasking(14, 75, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        mask, blocks = gen.sample(rng, return_blocks=True)
        union = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert 1 <= h < 14 and 1 <= w < 14
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            assert not union[top : top + h, left : left + w].all()  # it added a patch
            union[top : top + h, left : left + w] = True
            areas.append(h * w)
        assert np.all(mask[union]) and mask.sum() == 75
    assert min(areas) < 16 and max(areas) <= 75


# ----------------------------------------------------------------------------------------------
# The distribution against an independent formulation of the release's generator
# (unilm/beit2/masking_generator.py == naver-ai/dtm utils/masking_generator.py), written from the
# release's rules with Python's ``random`` and NumPy's legacy global generator, as the release
# draws them.
def release_masks(n: int, seed: int, grid: int = 14, count: int = 75, low: int = 16):
    """(masks (n, grid, grid) int, blocks per mask, top-up patches per mask)."""
    py, legacy = random.Random(seed), np.random.RandomState(seed)
    lo_log, hi_log = math.log(0.3), math.log(1 / 0.3)
    masks = np.zeros((n, grid, grid), np.int32)
    n_blocks, n_topup = np.zeros(n, int), np.zeros(n, int)
    for s in range(n):
        mask, done = masks[s], 0
        while done < count:
            cap, added = count - done, 0
            for _attempt in range(10):
                target = py.uniform(low, cap)
                ratio = math.exp(py.uniform(lo_log, hi_log))
                rows, cols = (
                    int(round(math.sqrt(target * ratio))),
                    int(round(math.sqrt(target / ratio))),
                )
                if cols < grid and rows < grid:
                    r0, c0 = py.randint(0, grid - rows), py.randint(0, grid - cols)
                    fresh = rows * cols - mask[r0 : r0 + rows, c0 : c0 + cols].sum()
                    if 0 < fresh <= cap:
                        for i in range(r0, r0 + rows):
                            for j in range(c0, c0 + cols):
                                if not mask[i, j]:
                                    mask[i, j], added = 1, added + 1
                    if added:
                        break
            if not added:
                break
            done, n_blocks[s] = done + added, n_blocks[s] + 1
        if done < count:
            ii, jj = (mask == 0).nonzero()
            pick = legacy.choice(len(ii), count - done, replace=False)
            mask[ii[pick], jj[pick]] = 1
            n_topup[s] = count - done
    return masks, n_blocks, n_topup


def our_masks(n: int, seed: int):
    gen, rng = BlockMasking(14, 75, min_num_patches=16), np.random.default_rng(seed)
    masks = np.zeros((n, 14, 14), bool)
    n_blocks, n_topup = np.zeros(n, int), np.zeros(n, int)
    for s in range(n):
        masks[s], blocks = gen.sample(rng, return_blocks=True)
        union = np.zeros((14, 14), bool)
        for top, left, h, w in blocks:
            union[top : top + h, left : left + w] = True
        n_blocks[s], n_topup[s] = len(blocks), 75 - union.sum()
    return masks, n_blocks, n_topup


def assert_same_mask_distribution(n: int, seed: int, position_sigmas: float):
    ours_m, ours_b, ours_t = our_masks(n, seed)
    rel_m, rel_b, rel_t = release_masks(n, seed + 1)
    assert (ours_m.reshape(n, -1).sum(1) == 75).all() and (rel_m.reshape(n, -1).sum(1) == 75).all()

    def close(a, b, sigmas=5.0):  # two-sample z-test of the means
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < sigmas * se, (a.mean(), b.mean(), se)

    close(ours_b, rel_b)  # blocks per mask
    close(ours_t > 0, rel_t > 0)  # fraction of masks topped up
    close(ours_t, rel_t)  # top-up patches per mask
    # the release's published figures (release-rules.md 1; docs/fidelity.md)
    assert abs(rel_b.mean() - 4.11) < 0.05 and abs(ours_b.mean() - 4.11) < 0.05
    assert abs((ours_t > 0).mean() - 0.334) < 0.02 and abs(ours_t.mean() - 0.527) < 0.05
    # per-position masking frequency, corners included
    p, q = ours_m.reshape(n, -1).mean(0), rel_m.reshape(n, -1).mean(0)
    se = np.sqrt((p * (1 - p) + q * (1 - q)) / n)
    assert np.abs(p - q).max() < position_sigmas * se.max(), np.abs(p - q).max()
    chi2 = float((((p - q) / se) ** 2).sum())  # about 196 +- 20 when the distributions agree
    assert chi2 < 196 + 6 * math.sqrt(2 * 196), chi2
    corners = [0, 13, 182, 195]
    pc, qc = ours_m.reshape(n, -1)[:, corners].mean(), rel_m.reshape(n, -1)[:, corners].mean()
    assert abs(pc - qc) < 5 * math.sqrt(2 * qc * (1 - qc) / (4 * n)) and 0.04 < qc < 0.053


def test_block_masks_follow_the_release_distribution():
    """20,000 masks each: blocks per mask, top-ups, per-position frequency (corners included)."""
    assert_same_mask_distribution(20_000, seed=0, position_sigmas=5.0)


@pytest.mark.slow
def test_block_masks_follow_the_release_distribution_100k():
    assert_same_mask_distribution(100_000, seed=7, position_sigmas=5.0)


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
