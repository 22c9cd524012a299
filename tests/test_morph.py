"""Token morphing: exact equality with an independent dense formulation, invariants, schedules."""

import math
import random

import pytest
import torch

from tokenmorph.morph import (
    Morph,
    bipartite_morph,
    effective_schedule,
    gram,
    identity_morph,
    morph_from_gram,
    sample_schedule,
    spread_schedule,
)

from .dense_reference import dense_group_means, dense_labels, dense_membership


def _cases(seed, count):
    """Random (N, D, schedule) cases: the sampler's schedules plus r = 0 and cap-hitting ones."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        N = rng.choice([49, 64, 196, 197])
        D = rng.choice([3, 8, 512])
        kind = i % 4
        if kind == 0:
            schedule = sample_schedule(N, k_max=14, generator=rng)
        elif kind == 1:
            schedule = [0] * rng.randint(1, 3)
        elif kind == 2:
            schedule = [N] * rng.randint(1, 6)  # every iteration hits the cap
        else:
            schedule = [rng.randint(0, N // 3) for _ in range(rng.randint(1, 6))]
        cases.append((N, D, schedule))
    return cases


@pytest.mark.parametrize("N,D,schedule", _cases(0, 40))
def test_reference_equals_dense_formulation(N, D, schedule):
    gen = torch.Generator().manual_seed(N * 1000 + D + len(schedule))
    x = torch.randn(3, N, D, generator=gen, dtype=torch.float64)
    m = bipartite_morph(x, schedule, mode="reference")
    M = dense_membership(x, schedule, protect_first=True)
    assert m.num_groups == M[0].shape[0] == N - sum(effective_schedule(N, schedule))
    assert torch.equal(m.labels, dense_labels(M))
    # sizes and group means agree with the dense matrix products
    assert torch.equal(m.sizes, torch.stack([Mi.sum(1) for Mi in M]).long())
    y = torch.randn(3, N, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m.reduce(y), dense_group_means(M, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        m.expand(m.reduce(y)),
        torch.stack([Mi.t() @ g for Mi, g in zip(M, dense_group_means(M, y))]),
    )


@pytest.mark.parametrize("seed", range(3))
def test_reference_equals_dense_float32_fixed_seeds(seed):
    """float32 inputs (what training uses): same partition as the float64 dense formulation."""
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(4, 196, 512, generator=gen)
    for schedule in ([14] * 14, [7] * 10, sample_schedule(196, generator=random.Random(seed))):
        m = bipartite_morph(x, schedule)
        assert torch.equal(m.labels, dense_labels(dense_membership(x, schedule)))


def test_paper_mode_equals_dense_with_same_random_split():
    """Paper mode: replay its random split through the dense formulation, no protected token."""
    N, D, schedule, B = 64, 16, [6, 6, 6, 6], 2
    x = torch.randn(B, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    m = bipartite_morph(x, schedule, mode="paper", generator=torch.Generator().manual_seed(7))
    # regenerate the same random numbers the morph drew: one (B, n) uniform per iteration
    gen = torch.Generator().manual_seed(7)
    perms, n = [], N
    for r in effective_schedule(N, schedule, protect_first=False):
        perms.append(torch.rand(B, n, generator=gen).argsort(dim=1))
        n -= r

    def splits(s, p, n):
        na = (n + 1) // 2
        return sorted(perms[p][s, :na].tolist()), sorted(perms[p][s, na:].tolist())

    M = dense_membership(x, schedule, protect_first=False, splits=splits)
    assert torch.equal(m.labels, dense_labels(M))


def test_paper_mode_seeded_and_unprotected():
    x = torch.randn(2, 49, 8, generator=torch.Generator().manual_seed(0))
    a = bipartite_morph(x, [24], mode="paper", generator=torch.Generator().manual_seed(1))
    b = bipartite_morph(x, [24], mode="paper", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.labels, b.labels)
    assert a.num_groups == 49 - 24  # cap floor(n/2), not floor((n-1)/2)
    # over several seeds the first token does merge away at least once (it is not protected)
    first_group_sizes = []
    for s in range(10):
        m = bipartite_morph(
            x, [24, 12, 6], mode="paper", generator=torch.Generator().manual_seed(s)
        )
        first_group_sizes.append(int(m.sizes.gather(1, m.labels[:, :1]).max()))
    assert max(first_group_sizes) > 1


def test_reference_protects_first_token():
    x = torch.randn(4, 196, 32, generator=torch.Generator().manual_seed(5))
    x[:, 0] = x[:, 1]  # the most similar pair possible: still never merged away
    m = bipartite_morph(x, [14] * 14)
    assert torch.all(m.labels[:, 0] == 0)  # stays at position 0, i.e. group 0


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_partition_invariants(mode):
    rng = random.Random(11)
    for _ in range(10):
        N = rng.choice([49, 196, 197])
        x = torch.randn(5, N, 16)
        schedule = sample_schedule(N, generator=rng)
        m = bipartite_morph(x, schedule, mode=mode, generator=torch.Generator().manual_seed(0))
        assert m.labels.dtype == torch.int64 and m.labels.shape == (5, N)
        assert int(m.labels.min()) >= 0 and int(m.labels.max()) < m.num_groups
        # every group non-empty, sizes count members, sum to N
        counts = torch.stack([torch.bincount(row, minlength=m.num_groups) for row in m.labels])
        assert torch.equal(counts, m.sizes)
        assert bool((m.sizes >= 1).all()) and bool((m.sizes.sum(1) == N).all())
        assert m.num_groups == N - sum(
            effective_schedule(N, schedule, protect_first=mode == "reference")
        )
        assert m.num_groups >= (2 if mode == "reference" else 1)


def test_no_gradient_and_input_untouched():
    x = torch.randn(2, 49, 8, requires_grad=True)
    K = gram(x)
    K0 = K.clone()
    m = morph_from_gram(K, [10, 10])
    assert torch.equal(K, K0)  # not modified unless inplace=True
    assert not m.labels.requires_grad and not K.requires_grad


def test_identity_schedules():
    x = torch.randn(2, 64, 8)
    for schedule in ([], [0], [0, 0, 0]):
        m = bipartite_morph(x, schedule)
        assert m.num_groups == 64 and torch.equal(m.labels, identity_morph(2, 64).labels)
    y = torch.randn(2, 64, 3)
    assert torch.equal(m.reduce(y), y) and torch.equal(m.expand(y), y)


def test_zero_tokens_do_not_produce_nan():
    """A zero token has cosine 0 with everything (F.normalize's eps): the grouping is still the
       release's,
    and the group means are finite."""
    x = torch.zeros(2, 49, 8, dtype=torch.float64)
    x[:, 10:] = torch.randn(2, 39, 8, dtype=torch.float64)
    m = bipartite_morph(x, [12, 12])
    assert torch.equal(m.labels, dense_labels(dense_membership(x, [12, 12])))
    assert torch.isfinite(m.reduce(x)).all() and m.num_groups == 49 - 24


def test_reduce_expand_against_dense_products_and_gradient():
    x = torch.randn(3, 64, 16, dtype=torch.float64)
    m = bipartite_morph(x, [8, 8, 8])
    onehot = torch.zeros(3, m.num_groups, 64, dtype=torch.float64).scatter_(
        1, m.labels[:, None, :], 1.0
    )
    y = torch.randn(3, 64, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m.reduce(y), onehot @ y / onehot.sum(-1, keepdim=True))
    torch.testing.assert_close(m.reduce(y, reduce="sum"), onehot @ y)
    z = torch.randn(3, m.num_groups, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(m.expand(z), onehot.transpose(1, 2) @ z)
    assert torch.autograd.gradcheck(m.reduce, (y,))
    assert torch.autograd.gradcheck(m.expand, (z,))


def test_shape_errors_are_clear():
    m = bipartite_morph(torch.randn(2, 49, 4), [5])
    with pytest.raises(ValueError, match="reduce"):
        m.reduce(torch.randn(3, 49, 4))
    with pytest.raises(ValueError, match="mode"):
        bipartite_morph(torch.randn(2, 49, 4), [5], mode="fast")
    with pytest.raises(ValueError, match=">= 0"):
        bipartite_morph(torch.randn(2, 49, 4), [-1])


def test_effective_schedule_caps():
    assert effective_schedule(196, [14] * 14) == [14] * 12 + [13, 7]
    assert 196 - sum(effective_schedule(196, [14] * 14)) == 8
    assert effective_schedule(196, [200]) == [97]
    assert effective_schedule(196, [200], protect_first=False) == [98]
    assert effective_schedule(5, [0, 3, 3]) == [0, 2, 1]


def test_release_scheduler_distribution_and_rule():
    rng = random.Random(0)
    seen_k, seen_zero = set(), False
    for _ in range(3000):
        s = sample_schedule(196, n_max=196, k_max=14, generator=rng)
        k, r = len(s), s[0]
        assert 1 <= k <= 14 and all(v == r for v in s)
        assert r * k <= 196
        seen_k.add(k)
        seen_zero |= r == 0
    assert seen_k == set(range(1, 15)) and seen_zero


def test_release_scheduler_matches_formula():
    """Replay the draws: num_merge ~ U{0..n_max}, k ~ U{1..k_max}, ceil unless over n_max."""
    for seed in range(200):
        s = sample_schedule(196, generator=random.Random(seed))
        rng = random.Random(seed)
        num_merge, k = rng.randint(0, 196), rng.randint(1, 14)
        r = math.ceil(num_merge / k)
        if r * k > 196:
            r = num_merge // k
        assert s == [r] * k


def test_schedulers_seeded_with_torch_generator():
    a = [sample_schedule(196, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert a[0] == a[1]
    b = [
        sample_schedule(196, scheduler="paper", generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert b[0] == b[1]


def test_paper_scheduler_leaves_exact_group_count():
    rng = random.Random(1)
    for _ in range(500):
        N = rng.choice([49, 196, 197])
        s = sample_schedule(N, scheduler="paper", k_max=14, generator=rng)
        assert effective_schedule(N, s) == s  # never relies on the cap
        assert N - sum(s) >= 2
    for N, G, k in [(196, 98, 1), (196, 8, 3), (196, 196, 5), (49, 2, 14)]:
        s = spread_schedule(N, G, k)
        assert N - sum(effective_schedule(N, s)) == G and len(s) >= k


def test_morph_is_a_frozen_dataclass():
    m = identity_morph(1, 4)
    assert isinstance(m, Morph)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        m.num_groups = 3


def test_fp16_matching_changes_groupings_reference_mode_is_the_fp32_one():
    """The release under fp16 autocast (emulated: fp16 features, merges and similarity products)
    groups a sizeable share of samples differently from its fp32 computation; reference mode is
    the fp32 computation exactly (docs/fidelity.md, precision row)."""
    from tokenmorph.bench import release_dense_membership

    tokens = torch.randn(16, 196, 64, generator=torch.Generator().manual_seed(0))
    for schedule in ([7] * 10,):
        ours = bipartite_morph(tokens, schedule).labels
        fp32 = release_dense_membership(tokens, schedule).argmax(1)
        fp16 = release_dense_membership(tokens, schedule, half=True).argmax(1)
        assert torch.equal(dense_group_order(ours), dense_group_order(fp32))
        changed = float((dense_group_order(fp16) != dense_group_order(fp32)).any(1).float().mean())
        assert changed >= 0.25, (schedule, changed)  # 6 of the 16 samples


def dense_group_order(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered by first appearance (the same partition gives the same tensor)."""
    out = torch.empty_like(labels)
    for b in range(labels.shape[0]):
        seen = {}
        for i, g in enumerate(labels[b].tolist()):
            out[b, i] = seen.setdefault(g, len(seen))
    return out
