"""An independent, deliberately plain formulation of token morphing, for tests only.

It follows the paper's matrix notation: every iteration p builds a binary merge matrix E^p (n_p x
n_{p-1}) sample by sample with Python loops; membership is the product E^k ... E^1 (G x N); group
features are ``membership @ V / sizes``; matching uses those features directly (no Gram trick, no
slots, no labels). Nothing here is shared with ``tokenmorph.morph``.
"""

from __future__ import annotations

import math

import torch


def merge_matrix(n: int, a_pos, b_pos, src_a, dst_b, unm_a) -> torch.Tensor:
    """E (n_new x n): new sequence = [unmerged A in given order] + [B], merged A rows added to
    partners."""
    n_new = len(unm_a) + len(b_pos)
    E = torch.zeros(n_new, n, dtype=torch.float64)
    for row, ai in enumerate(unm_a):
        E[row, a_pos[ai]] = 1
    for j, bp in enumerate(b_pos):
        E[len(unm_a) + j, bp] = 1
    for ai, bj in zip(src_a, dst_b):
        E[len(unm_a) + bj, a_pos[ai]] = 1
    return E


def dense_membership(
    tokens: torch.Tensor, schedule, protect_first: bool = True, splits=None
) -> list[torch.Tensor]:
    """Per sample, the (G, N) binary membership matrix of the release's morphing.

    ``splits``: optional callable (sample, iteration, n) -> (a_positions, b_positions) replacing
    the alternating split (used to replay paper mode's random split).
    """
    out = []
    for s in range(tokens.shape[0]):
        V = tokens[s].to(torch.float64)
        N = V.shape[0]
        M = torch.eye(N, dtype=torch.float64)
        for p, r in enumerate(schedule):
            n = M.shape[0]
            r = min(int(r), (n - 1) // 2 if protect_first else n // 2)
            if r <= 0:
                continue
            feats = (M @ V) / M.sum(1, keepdim=True)
            feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if splits is None:
                a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
            else:
                a_pos, b_pos = splits(s, p, n)
            best, partner = [], []
            for i, ap in enumerate(a_pos):
                if protect_first and i == 0:
                    best.append(-math.inf)
                    partner.append(0)
                    continue
                sims = [float(feats[ap] @ feats[bp]) for bp in b_pos]
                j = max(range(len(sims)), key=lambda t: (sims[t], -t))  # first maximum
                best.append(sims[j])
                partner.append(j)
            ranked = sorted(range(len(a_pos)), key=lambda i: (-best[i], i))  # stable, descending
            src = ranked[:r]
            unm = sorted(ranked[r:])
            E = merge_matrix(n, a_pos, b_pos, src, [partner[i] for i in src], unm)
            M = E @ M
        out.append(M)
    return out


def dense_labels(membership: list[torch.Tensor]) -> torch.Tensor:
    """(B, N) group index of each token, read off the membership matrices."""
    return torch.stack([M.argmax(0) for M in membership])


def dense_group_means(membership: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, G, C): membership @ x / sizes."""
    return torch.stack(
        [(M @ x[s].to(M.dtype)) / M.sum(1, keepdim=True) for s, M in enumerate(membership)]
    )
