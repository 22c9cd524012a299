"""Dynamic Token Morphing: iterative bipartite matching of target tokens into groups.

The morphing function of DTM (docs/method.md 1.3) turns N target tokens into G groups by ``k``
rounds of bipartite matching: split the current sequence into sets A and B, link every A-token to
its most cosine-similar B-token, merge the ``r_p`` best-linked A-tokens into their partners.

The official release tracks a dense (B, n, N) membership matrix per round and aggregates with
matrix products. Here the grouping is carried as integer labels, and matching runs on a Gram
matrix:

* the cosine similarity of two groups' mean features equals ``<S_g, S_h> / (|S_g| |S_h|)`` with
  ``S`` the member sums, and ``<S_g, S_h>`` is a sum of Gram entries of the members. So the (B,
  N, N) Gram of the original tokens is computed once (shared by every level of the loss), and a
  merge only adds ``r`` rows and columns into their partners' ("slots": a group lives in the slot
  of its B-token);
* aggregation is a scatter over (B, N) labels: O(B N C) instead of O(B G N C).

``mode="reference"`` reproduces the release's grouping exactly; ``mode="paper"`` is the paper's
reading (random split, nothing protected). See :func:`bipartite_morph`.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = [
    "Morph",
    "bipartite_morph",
    "morph_from_gram",
    "gram",
    "effective_schedule",
    "sample_schedule",
    "sample_schedules",
    "spread_schedule",
    "identity_morph",
    "resolve_schedules",
    "default_groups",
    "schedule_text",
]

MODES = ("reference", "paper")
SCHEDULERS = ("release", "paper")
_EPS = 1e-12  # as F.normalize: a zero vector has cosine 0 with everything, never NaN


@dataclass(frozen=True)
class Morph:
    """A partition of N tokens into G groups, identical in size for every batch element.

    Attributes:
        labels: (B, N) int64, group index of every original token, in ``[0, num_groups)``. Groups
            are numbered in the order of the final merged sequence (as the release's membership
            rows).
        num_groups: G.
        sizes: (B, G) int64, members per group (every entry >= 1).
    """

    labels: torch.Tensor
    num_groups: int
    sizes: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.labels.shape[1]

    def _flat_index(self) -> torch.Tensor:
        """(B*N,) labels offset per batch element, to index a (B*G, C) flattening."""
        B = self.labels.shape[0]
        offset = torch.arange(B, device=self.labels.device)[:, None] * self.num_groups
        return (self.labels + offset).reshape(-1)

    def reduce(self, x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Aggregate tokens per group: (B, N, C) -> (B, G, C); ``reduce`` is "mean" or "sum".

        Differentiable in ``x`` (the backward pass is a gather).
        """
        B, N, C = x.shape
        if (B, N) != tuple(self.labels.shape):
            raise ValueError(
                f"reduce: x has batch/tokens {(B, N)} but the morph was built for "
                f"{tuple(self.labels.shape)}"
            )
        out = x.new_zeros(B * self.num_groups, C).index_add_(
            0, self._flat_index(), x.reshape(B * N, C)
        )
        out = out.view(B, self.num_groups, C)
        if reduce == "sum":
            return out
        if reduce != "mean":
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        return out / self.sizes.to(out.dtype).unsqueeze(-1)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """Broadcast group values back to tokens: (B, G, C) -> (B, N, C)."""
        B, G, C = y.shape
        if G != self.num_groups or B != self.labels.shape[0]:
            raise ValueError(
                f"expand: y has shape {tuple(y.shape)}, expected (B={self.labels.shape[0]}, "
                f"G={self.num_groups}, C)"
            )
        return y.reshape(B * G, C).index_select(0, self._flat_index()).view(B, -1, C)

    def count(self, weights: torch.Tensor) -> torch.Tensor:
        """Sum a per-token quantity per group: (B, N) -> (B, G)."""
        return self.reduce(weights.unsqueeze(-1), reduce="sum").squeeze(-1)


def identity_morph(batch: int, num_tokens: int, device=None) -> Morph:
    """Token-wise grouping (every token its own group), what a schedule of zeros gives."""
    labels = torch.arange(num_tokens, device=device).expand(batch, num_tokens).contiguous()
    return Morph(labels, num_tokens, torch.ones(batch, num_tokens, dtype=torch.long, device=device))


def effective_schedule(
    num_tokens: int, schedule: Sequence[int], protect_first: bool = True
) -> list[int]:
    """The merge counts that actually happen: each ``r_p`` capped at floor(n/2), or
           floor((n-1)/2)
    when the first token is protected, where n is the current sequence length. Zeros are kept."""
    n, out = num_tokens, []
    for r in schedule:
        r = int(r)
        if r < 0:
            raise ValueError(f"schedule entries must be >= 0, got {r} in {list(schedule)}")
        r = min(r, (n - 1) // 2 if protect_first else n // 2)
        r = max(r, 0)
        out.append(r)
        n -= r
    return out


def gram(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) Gram matrix in at least float32 (autocast off: matching must be
    exact)."""
    with torch.autocast(tokens.device.type, enabled=False):
        t = tokens.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return torch.bmm(t, t.transpose(1, 2))


def bipartite_morph(
    tokens: torch.Tensor,
    schedule: Sequence[int],
    mode: str = "reference",
    generator: torch.Generator | None = None,
) -> Morph:
    """Group tokens by iterative bipartite matching (docs/method.md 1.3).

    Args:
        tokens: (B, N, D) features that decide the grouping (DTM: the teacher's targets). No
            gradient flows through the grouping.
        schedule: per-iteration merge counts ``[r_1, ..., r_k]``; each is capped by the current
            length (see :func:`effective_schedule`), so the result has ``N - sum(effective)``
            groups.
        mode: ``"reference"``: the official release exactly: alternating split (A = even, B = odd
            positions of the current sequence), the first token protected, new sequence
            ``[unmerged A in order] + [B]``, ties broken towards the lower index.
            ``"paper"``: a random split of every sequence per sample and iteration, nothing
            protected.
        generator: random source for ``mode="paper"``.

    Returns:
        A :class:`Morph` with (B, N) labels.
    """
    return morph_from_gram(gram(tokens), schedule, mode=mode, generator=generator, inplace=True)


def morph_from_gram(
    gram_matrix: torch.Tensor,
    schedule: Sequence[int],
    mode: str = "reference",
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> Morph:
    """:func:`bipartite_morph` from a precomputed (B, N, N) Gram matrix; ``inplace=True`` lets it
       be
    overwritten (saves a copy when the caller needs it no more)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if gram_matrix.dim() != 3 or gram_matrix.shape[1] != gram_matrix.shape[2]:
        raise ValueError(f"expected a (B, N, N) Gram matrix, got shape {tuple(gram_matrix.shape)}")
    B, N, _ = gram_matrix.shape
    device = gram_matrix.device
    protect = mode == "reference"
    rs = [r for r in effective_schedule(N, schedule, protect_first=protect) if r > 0]
    if not rs:
        return identity_morph(B, N, device)

    # Merged in place: the rows and columns of a group's slot hold its member sums.
    K = gram_matrix if inplace else gram_matrix.clone()
    rows = torch.arange(B, device=device)[:, None]
    seq = torch.arange(N, device=device).expand(B, N)  # slot of every sequence position
    owner = torch.arange(N, device=device).expand(B, N)  # slot that holds each original token
    for r in rs:
        n = seq.shape[1]
        if protect:  # alternating split, the release's a = x[..., ::2, :], b = x[..., 1::2, :]
            a, b = seq[:, 0::2], seq[:, 1::2]
        else:
            rand_device = generator.device if generator is not None else device
            perm = (
                torch.rand(B, n, generator=generator, device=rand_device).to(device).argsort(dim=1)
            )
            na = (n + 1) // 2
            a = seq.gather(1, perm[:, :na].sort(dim=1).values)
            b = seq.gather(1, perm[:, na:].sort(dim=1).values)
        na, nb = a.shape[1], b.shape[1]
        inv_norm = (
            K.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(_EPS).reciprocal()
        )  # (B, N) by slot
        dots = (
            K.view(B, N * N)
            .gather(1, (a[:, :, None] * N + b[:, None, :]).view(B, na * nb))
            .view(B, na, nb)
        )
        # The A-norm does not change which B is best: scale the (B, na) maxima, not the (B, na,
        # nb) scores.
        node_max, node_idx = (dots * inv_norm.gather(1, b)[:, None, :]).max(dim=-1)
        node_max = node_max * inv_norm.gather(1, a)
        if protect:
            node_max[:, 0] = -math.inf
        order = node_max.argsort(dim=-1, descending=True, stable=True)
        src_i, unm_i = order[:, :r], order[:, r:].sort(dim=1).values
        src = a.gather(1, src_i)  # (B, r) slots that merge away
        dst = b.gather(1, node_idx.gather(1, src_i))  # (B, r) slots they merge into
        # Group sums add up, so the Gram of the merged groups is: add source rows, then source
        # columns.
        K.scatter_add_(
            1, dst[:, :, None].expand(B, r, N), K.gather(1, src[:, :, None].expand(B, r, N))
        )
        K.scatter_add_(
            2, dst[:, None, :].expand(B, N, r), K.gather(2, src[:, None, :].expand(B, N, r))
        )
        remap = torch.arange(N, device=device).repeat(B, 1).scatter_(1, src, dst)
        owner = remap.gather(1, owner)
        seq = torch.cat([a.gather(1, unm_i), b], dim=1)
        assert seq.shape[1] == na + nb - r

    G = seq.shape[1]
    position = torch.empty(B, N, dtype=torch.long, device=device)
    position.scatter_(1, seq, torch.arange(G, device=device).expand(B, G))
    labels = position.gather(1, owner)
    sizes = torch.zeros(B * G, dtype=torch.long, device=device)
    sizes.index_add_(
        0, (labels + rows * G).reshape(-1), torch.ones(B * N, dtype=torch.long, device=device)
    )
    return Morph(labels, G, sizes.view(B, G))


def _uniform_int(low: int, high: int, generator) -> int:
    """U{low..high} inclusive, from a torch.Generator, a random.Random, or the global torch RNG."""
    if isinstance(generator, _random.Random):
        return generator.randint(low, high)
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _release_schedule(num_merge: int, k: int, n_max: int) -> list[int]:
    """The release's rule: r = ceil(num_merge / k), floor when r * k > n_max; [r] * k."""
    r = math.ceil(num_merge / k)
    if r * k > n_max:
        r = num_merge // k
    return [r] * k


def _check_schedule_bounds(scheduler: str, num_tokens: int, n_max: int, k_max: int) -> None:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if not 0 <= n_max <= num_tokens:
        raise ValueError(f"n_max must be in [0, num_tokens={num_tokens}], got {n_max}")


def sample_schedule(
    num_tokens: int = 196,
    n_max: int | None = None,
    k_max: int = 14,
    scheduler: str = "release",
    generator=None,
    protect_first: bool = True,
    min_groups: int = 1,
) -> list[int]:
    """Draw one dynamic morphing schedule (docs/method.md 1.4).

    ``scheduler="release"`` (default): num_merge ~ U{0..n_max}, k ~ U{1..k_max} (in this order);
    r = ceil(num_merge / k), or floor(num_merge / k) when r * k > n_max; schedule = [r] * k.
    (The per-iteration cap then applies inside the morph, so fewer merges may happen.) Several
    levels are drawn together by :func:`sample_schedules`, in the release's order.

    ``scheduler="paper"``: draw the number of remaining groups n_bar ~ U{min_groups..N} and
    k ~ U{1..k_max}; spread the N - n_bar merges over the iterations as evenly as the caps allow,
    adding iterations at the end if the caps require them, so exactly N - n_bar merges happen.

    Args:
        num_tokens: N, tokens before morphing.
        n_max: largest num_merge (release), default N.
        k_max: largest number of iterations.
        generator: ``torch.Generator`` or ``random.Random`` for seeding (global torch RNG if
            None).
        protect_first: whether the morph protects the first token (``mode="reference"``), which
            sets the caps used by the paper scheduler.
        min_groups: smallest n_bar of the paper scheduler.
    """
    n_max = num_tokens if n_max is None else n_max
    _check_schedule_bounds(scheduler, num_tokens, n_max, k_max)
    if scheduler == "release":
        num_merge = _uniform_int(0, n_max, generator)
        return _release_schedule(num_merge, _uniform_int(1, k_max, generator), n_max)

    floor_groups = 2 if protect_first else 1
    min_groups = max(min_groups, floor_groups)
    if not min_groups <= num_tokens:
        raise ValueError(f"min_groups={min_groups} exceeds num_tokens={num_tokens}")
    n_bar = _uniform_int(min_groups, num_tokens, generator)
    k = _uniform_int(1, k_max, generator)
    return spread_schedule(num_tokens, n_bar, k, protect_first)


def sample_schedules(
    num_levels: int,
    num_tokens: int = 196,
    n_max: int | None = None,
    k_max: int = 14,
    scheduler: str = "release",
    generator=None,
    protect_first: bool = True,
) -> list[list[int]]:
    """The L schedules of one draw (one step of one chunk of the batch).

    ``scheduler="release"``: the release's order of draws (engines/engine_for_dtm.py): the
    num_merge of every level first, then the k of every level (nm1, nm2, k1, k2 for L = 2), each
    schedule by :func:`sample_schedule`'s rule with the same ``n_max``. ``scheduler="paper"``:
    :func:`sample_schedule` once per level (n_bar then k).
    """
    n_max = num_tokens if n_max is None else n_max
    _check_schedule_bounds(scheduler, num_tokens, n_max, k_max)
    if scheduler == "paper":
        return [
            sample_schedule(num_tokens, n_max, k_max, scheduler, generator, protect_first)
            for _ in range(num_levels)
        ]
    merges = [_uniform_int(0, n_max, generator) for _ in range(num_levels)]
    ks = [_uniform_int(1, k_max, generator) for _ in range(num_levels)]
    return [_release_schedule(m, k, n_max) for m, k in zip(merges, ks)]


def spread_schedule(
    num_tokens: int, num_groups: int, k: int, protect_first: bool = True
) -> list[int]:
    """A schedule of at least ``k`` iterations that leaves exactly ``num_groups`` groups: the
       merges
    are spread as evenly as the per-iteration caps allow, with extra iterations at the end if the
    caps require them. E.g. ``spread_schedule(196, 98, 1) == [97, 1]`` with the first token
    protected."""
    floor_groups = 2 if protect_first else 1
    if not floor_groups <= num_groups <= num_tokens:
        raise ValueError(f"num_groups must be in [{floor_groups}, {num_tokens}], got {num_groups}")
    n, left, schedule = num_tokens, num_tokens - num_groups, []
    while left > 0 or len(schedule) < k:
        iters_left = max(k - len(schedule), 1)
        cap = (n - 1) // 2 if protect_first else n // 2
        r = min(math.ceil(left / iters_left), cap)
        schedule.append(r)
        n, left = n - r, left - r
    return schedule


# Default target group counts as fractions of N: 196 -> 196, 98, 49, 16, 8 (viz morph, analyze
# consistency).
DEFAULT_GROUP_FRACTIONS = (1, 1 / 2, 1 / 4, 1 / 12, 1 / 24)


def resolve_schedules(
    num_tokens: int,
    groups: Sequence[int] | None = None,
    schedules: Sequence[Sequence[int]] | None = None,
    iterations: int = 14,
    mode: str = "reference",
) -> list[list[int]]:
    """Morphing schedules from explicit ``schedules`` or from target group counts.

    A group count G becomes ``spread_schedule(N, G, iterations)``: ``iterations``
    bipartite-matching rounds that leave exactly G groups (G = N is the identity). Raises a
    one-line ``ConfigError`` for a group count outside [2, N] (reference mode protects the first
    token, so it never merges) or [1, N] (paper), or a negative schedule entry."""
    protect = mode == "reference"
    if schedules:
        bad = [list(s) for s in schedules if any(r < 0 for r in s)]
        if bad:
            raise ConfigError(f"schedule entries must be >= 0, got {bad}")
        return [list(s) for s in schedules]
    lowest = 2 if protect else 1
    groups = list(groups or [])
    bad = [g for g in groups if not lowest <= g <= num_tokens]
    if bad or not groups:
        raise ConfigError(
            f"--groups {bad or groups} out of range: give group counts in [{lowest}, {num_tokens}] "
            f"for {num_tokens} tokens"
        )
    if iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {iterations}")
    return [spread_schedule(num_tokens, g, iterations, protect) for g in groups]


def default_groups(num_tokens: int, mode: str = "reference") -> list[int]:
    """N, N/2, N/4, N/12, N/24 rounded (196 -> 196, 98, 49, 16, 8), at least the smallest allowed
    count."""
    lowest = 2 if mode == "reference" else 1
    return sorted(
        {max(lowest, round(num_tokens * f)) for f in DEFAULT_GROUP_FRACTIONS}, reverse=True
    )


def schedule_text(schedule: Sequence[int]) -> str:
    """A schedule, run-length encoded: [7] * 14 -> '7x14'; [11, 11, 10] -> '11x2,10'; no merges
           ->
    'none'."""
    from itertools import groupby

    runs = [(r, len(list(g))) for r, g in groupby(int(r) for r in schedule if r)]
    return ",".join(f"{r}x{k}" if k > 1 else str(r) for r, k in runs) or "none"
