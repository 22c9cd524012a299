"""DTM loss: values against direct per-token formulas, gradients, options, the nn.Module wrapper."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tokenmorph.bench import release_dense_dtm_loss
from tokenmorph.losses import DISTANCES, DTMLoss, dtm_loss, token_distance
from tokenmorph.morph import bipartite_morph

from .dense_reference import dense_membership


def _broadcast_means(M, x):
    """Every token replaced by its group mean, via the dense membership matrices: (B, N, C)."""
    return torch.stack([Mi.t() @ ((Mi @ x[s]) / Mi.sum(1, keepdim=True)) for s, Mi in enumerate(M)])


def _direct_distance(u, v, distance, beta):
    d = u - v
    if distance == "smooth_l1":
        return torch.where(d.abs() < beta, 0.5 * d**2 / beta, d.abs() - 0.5 * beta).mean(-1)
    if distance == "l1":
        return d.abs().mean(-1)
    if distance == "l2":
        return (d**2).mean(-1)
    return 1 - (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))


def _data(B=3, N=49, C=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, N, C, generator=g, dtype=torch.float64) * 2,
        torch.randn(B, N, C, generator=g, dtype=torch.float64) * 2,
    )


@pytest.mark.parametrize("distance", DISTANCES)
def test_release_semantics_equal_per_token_formula(distance):
    pred, target = _data()
    schedules = [[6, 6, 6], [0], [20]]
    per_level = []
    for s in schedules:
        M = dense_membership(target, s)
        u, v = _broadcast_means(M, pred), _broadcast_means(M, target)
        per_level.append(_direct_distance(u, v, distance, 2.0).mean())  # mean over all B x N tokens
    expected = torch.stack(per_level).mean()
    got = dtm_loss(pred, target, schedules, distance=distance)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_matches_release_dense_loss_float32():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 196, 64, generator=g), torch.randn(4, 196, 64, generator=g)
    schedules = [[14] * 14, [7] * 10]
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    a = dtm_loss(p1, target, schedules)
    b = release_dense_dtm_loss(p2, target, schedules)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-9)


def test_masked_only_and_per_group():
    pred, target = _data(seed=2)
    mask = torch.rand(3, 49, generator=torch.Generator().manual_seed(0)) < 0.6
    s = [8, 8]
    M = dense_membership(target, s)
    u, v = _broadcast_means(M, pred), _broadcast_means(M, target)
    d = _direct_distance(u, v, "smooth_l1", 2.0)  # (B, N)
    torch.testing.assert_close(dtm_loss(pred, target, [s], mask=mask), d[mask].mean())
    # one term per group: group distances, each group once
    group_d = torch.stack(
        [
            _direct_distance(
                (Mi @ pred[b]) / Mi.sum(1, keepdim=True),
                (Mi @ target[b]) / Mi.sum(1, keepdim=True),
                "smooth_l1",
                2.0,
            )
            for b, Mi in enumerate(M)
        ]
    )
    torch.testing.assert_close(dtm_loss(pred, target, [s], per_group=True), group_d.mean())
    # per group with mask: only groups holding a masked token
    has_masked = torch.stack([(Mi @ mask[b].double()) > 0 for b, Mi in enumerate(M)])
    torch.testing.assert_close(
        dtm_loss(pred, target, [s], per_group=True, mask=mask), group_d[has_masked].mean()
    )


def test_normalize_target_after_aggregation_uses_the_unbiased_variance():
    """The release standardises each broadcast target token with torch.var (unbiased: divides by
    C - 1), eps 1e-6 inside the square root; this test used to encode the biased variance."""
    pred, target = _data(seed=3)
    s = [10]
    M = dense_membership(target, s)
    v = _broadcast_means(M, target)
    C = v.shape[-1]
    centred = v - v.sum(-1, keepdim=True) / C
    v_release = centred / torch.sqrt((centred**2).sum(-1, keepdim=True) / (C - 1) + 1e-6)
    v_biased = centred / torch.sqrt((centred**2).sum(-1, keepdim=True) / C + 1e-6)
    got = dtm_loss(pred, target, [s], distance="l2", normalize_target=True)
    expected = _direct_distance(_broadcast_means(M, pred), v_release, "l2", 2.0).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    biased = _direct_distance(_broadcast_means(M, pred), v_biased, "l2", 2.0).mean()
    assert abs(float(got - biased)) > 1e-3


def test_token_wise_when_schedule_is_zero():
    pred, target = _data(seed=4)
    expected = F.smooth_l1_loss(pred, target, beta=2.0)
    torch.testing.assert_close(dtm_loss(pred, target, [[0]]), expected)


@pytest.mark.parametrize("distance", DISTANCES)
def test_gradients_flow_to_pred_only(distance):
    pred, target = _data(B=2, N=16, C=4, seed=5)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    loss = dtm_loss(pred, target, [[3, 3], [5]], distance=distance)
    loss.backward()
    assert pred.grad is not None and target.grad is None
    fn = lambda p: dtm_loss(p, target.detach(), [[3, 3], [5]], distance=distance)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred.detach().clone().requires_grad_(True),))


def test_grouping_comes_from_target():
    pred, target = _data(seed=6)
    morph = bipartite_morph(target, [10, 10])
    torch.testing.assert_close(dtm_loss(pred, target, [[10, 10]]), dtm_loss(pred, target, [morph]))
    other = bipartite_morph(pred, [10, 10])
    assert not torch.equal(other.labels, morph.labels)


def test_bf16_inputs_under_autocast_compute_in_float32():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.randn(2, 49, 8, generator=g), torch.randn(2, 49, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dtm_loss(pred.bfloat16(), target.bfloat16(), [[6, 6]])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, dtm_loss(pred.bfloat16().float(), target.bfloat16().float(), [[6, 6]])
    )


def test_token_distance_needs_v_for_cosine_and_rejects_unknown():
    with pytest.raises(ValueError, match="cosine"):
        token_distance(torch.randn(2, 3), None, "cosine")
    with pytest.raises(ValueError, match="distance"):
        dtm_loss(torch.randn(1, 4, 2), torch.randn(1, 4, 2), [[1]], distance="huber")
    with pytest.raises(ValueError, match="mask"):
        dtm_loss(
            torch.randn(1, 4, 2),
            torch.randn(1, 4, 2),
            [[1]],
            mask=torch.ones(1, 5, dtype=torch.bool),
        )


def test_dtm_loss_module_samples_schedules_reproducibly():
    pred, target = _data(B=2, N=196, C=8, seed=8)
    a, b = DTMLoss(num_levels=2, seed=3), DTMLoss(num_levels=2, seed=3)
    la, lb = a(pred, target), b(pred, target)
    assert a.last_schedules == b.last_schedules and len(a.last_schedules) == 2
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(la, dtm_loss(pred, target, a.last_schedules))
    # the release's order of draws: the num_merge of both levels, then their k (this test used
    # to expect num_merge and k level by level)
    rng = random.Random(3)
    merges = [rng.randint(0, 196) for _ in range(2)]
    ks = [rng.randint(1, 14) for _ in range(2)]
    rule = [math.ceil(m / k) if math.ceil(m / k) * k <= 196 else m // k for m, k in zip(merges, ks)]
    assert a.last_schedules == [[r] * k for r, k in zip(rule, ks)]
    # masked_only uses the mask, otherwise it is ignored
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, :50] = True
    c = DTMLoss(num_levels=1, seed=1, masked_only=True)
    loss_c = c(pred, target, mask)
    torch.testing.assert_close(loss_c, dtm_loss(pred, target, c.last_schedules, mask=mask))


def test_chunked_loss_is_the_mean_over_all_tokens_of_each_chunks_grouping():
    """Chunks with schedules of their own (the release: one draw per GPU): every token is
    replaced by its group mean under its chunk's schedule, the distance is averaged over all B x
    N tokens of the batch per level, then over levels; the runs of a chunk need not be
    contiguous."""
    pred, target = _data(B=5, N=49, C=8, seed=11)
    chunks = [3, 3, 8, 8, 3]
    schedules = {3: [[6, 6], [0]], 8: [[20], [3, 3, 3]]}
    per_level = []
    for level in range(2):
        u, v = torch.empty_like(pred), torch.empty_like(target)
        for b, c in enumerate(chunks):
            M = dense_membership(target[b : b + 1], schedules[c][level])
            u[b], v[b] = (
                _broadcast_means(M, pred[b : b + 1])[0],
                _broadcast_means(M, target[b : b + 1])[0],
            )
        per_level.append(_direct_distance(u, v, "smooth_l1", 2.0).mean())
    expected = torch.stack(per_level).mean()
    got = dtm_loss(pred, target, schedules, chunks=chunks)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # one chunk is dtm_loss
    torch.testing.assert_close(
        dtm_loss(pred, target, {0: schedules[3]}, chunks=[0] * 5),
        dtm_loss(pred, target, schedules[3]),
    )
