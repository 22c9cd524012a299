"""The DTM loss (docs/method.md 1.5) and the per-token distances it is built from.

Release semantics (default): at each level every token is replaced by its group mean (prediction
and target alike) and the loss is the mean over all B x N positions of a channel-mean distance.
Because all members of a group then carry the same pair of vectors, that equals a size-weighted
mean over the G groups, which is how it is computed here: no broadcast back to N tokens.

Three lines in an existing MIM loop::

    from tokenmorph.losses import DTMLoss
    criterion = DTMLoss(num_levels=2)          # samples its own schedules every call
    loss = criterion(student_tokens, teacher_tokens)   # (B, N, D) each
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .morph import Morph, gram, morph_from_gram, sample_schedules

__all__ = [
    "DISTANCES",
    "SCHEDULERS",
    "token_distance",
    "dtm_loss",
    "DTMLoss",
    "patch_mse",
    "zoom_in_mask_loss",
    "zoom_out_loss",
]


def _smooth_l1(u, v, beta):
    return F.smooth_l1_loss(u, v, reduction="none", beta=beta).mean(-1)


def _l1(u, v, beta):
    return F.l1_loss(u, v, reduction="none").mean(-1)


def _l2(u, v, beta):
    return F.mse_loss(u, v, reduction="none").mean(-1)


def _cosine(u, v, beta):
    return 1.0 - F.cosine_similarity(u, v, dim=-1, eps=1e-8)


# name -> per-token distance (u, v, beta) -> (...): the config's ``distance`` choices come from
# here.
DISTANCES = {"smooth_l1": _smooth_l1, "l1": _l1, "l2": _l2, "cosine": _cosine}
SCHEDULERS = ("release", "paper", "none")  # DTMLoss's: the morph schedulers, or none (token-wise)


def token_distance(
    u: torch.Tensor,
    v: torch.Tensor | None = None,
    distance: str = "smooth_l1",
    beta: float = 2.0,
) -> torch.Tensor:
    """Per-token distance averaged over channels: (..., C), (..., C) -> (...).

    smooth_l1: 0.5 d^2 / beta where |d| < beta, else |d| - beta / 2 (d = u - v). l1: |d|. l2: d^2
    (MSE).
    cosine: 1 - cos(u, v) (the negative cosine shifted to be >= 0; gradients are those of -cos).
    ``v=None`` means ``u`` already is the difference d (not for cosine).
    """
    fn = DISTANCES.get(distance)
    if fn is None:
        raise ValueError(f"distance must be one of {tuple(DISTANCES)}, got {distance!r}")
    if v is None:
        if distance == "cosine":
            raise ValueError("the cosine distance needs both u and v")
        v = torch.zeros((), dtype=u.dtype, device=u.device).expand_as(
            u
        )  # stride 0: the fused kernels, no copy
    return fn(u, v, beta)


def _normalize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-token standardisation over channels, the DTM release's ``normalize_target``:
    ``(x - mean) / sqrt(var + 1e-6)`` with the unbiased variance (``torch.var``, divides by C -
    1)."""
    var, mean = torch.var_mean(x, dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def _level_terms(
    m: Morph,
    pred: torch.Tensor,
    target: torch.Tensor,
    diff: torch.Tensor | None,
    distance: str,
    beta: float,
    normalize_target: bool,
    mask: torch.Tensor | None,
    per_group: bool,
) -> torch.Tensor:
    if diff is not None:
        # Group means are linear: mean(pred) - mean(target) = mean(pred - target), one scatter
        # not two.
        d = token_distance(m.reduce(diff), None, distance, beta)
    else:
        v = m.reduce(target)
        if normalize_target:
            v = _normalize_tokens(v)
        d = token_distance(m.reduce(pred), v, distance, beta)  # (B, G)
    if mask is None:
        weight = m.sizes.to(d.dtype)  # tokens per group: the per-token mean
    else:
        weight = m.count(mask.to(d.dtype))  # masked tokens per group
    if per_group:
        weight = (weight > 0).to(d.dtype)
    return (d * weight).sum(), weight.sum()


def _check_inputs(pred, target, distance, mask, schedules) -> None:
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred and target must both be (B, N, C); got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {tuple(DISTANCES)}, got {distance!r}")
    if mask is not None and tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"mask must be (B, N) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    if len(schedules) == 0:
        raise ValueError(
            "schedules must hold at least one level (use [[0]] for token-wise distillation)"
        )


def _dtm_terms(
    pred, target, schedules, mode, distance, beta, normalize_target, mask, per_group, generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level: (sum of weighted distances, sum of weights), float32 or float64, autocast off."""
    wide = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pred = pred.to(wide)
    target = target.detach().to(wide)
    # Distances of the difference only (smooth_l1, l1, l2) reduce pred - target in one pass.
    diff = pred - target if distance != "cosine" and not normalize_target else None
    K = None
    terms = []
    last_morphed = max((i for i, s in enumerate(schedules) if not isinstance(s, Morph)), default=-1)
    for i, level in enumerate(schedules):
        if isinstance(level, Morph):
            m = level
        else:
            if K is None:  # one Gram serves every level
                K = gram(target)
            m = morph_from_gram(K, level, mode=mode, generator=generator, inplace=i == last_morphed)
        terms.append(
            _level_terms(m, pred, target, diff, distance, beta, normalize_target, mask, per_group)
        )
    return terms


def dtm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    schedules,
    mode: str = "reference",
    distance: str = "smooth_l1",
    beta: float = 2.0,
    normalize_target: bool = False,
    mask: torch.Tensor | None = None,
    per_group: bool = False,
    generator: torch.Generator | None = None,
    chunks: Sequence[int] | None = None,
) -> torch.Tensor:
    """DTM loss averaged over levels.

    Args:
        pred: (B, N, C) student predictions (gradients flow here only).
        target: (B, N, C) teacher targets; the grouping is computed from them, without gradient.
        schedules: one entry per level: a list of merge counts, or a prebuilt :class:`Morph`.
            A schedule of zeros (or ``[]``) is plain token-wise distillation. With ``chunks``: a
            dict chunk -> its levels' schedules (the same number of levels for every chunk).
        mode: morphing mode, ``"reference"`` (release) or ``"paper"``.
        distance: "smooth_l1" (default, beta 2.0), "l1", "l2", "cosine".
        normalize_target: standardise each aggregated target over channels (the release's:
            unbiased variance, eps 1e-6 inside the square root).
        mask: optional (B, N) bool; when given, only masked (True) positions contribute.
        per_group: one term per group (each group weighs the same) instead of one per token.
            With ``mask``, only groups holding at least one masked token count.
        generator: random source of ``mode="paper"``.
        chunks: optional B ints, the chunk of every sample (e.g. its position in the global
            batch // the chunk size), each chunk grouped by its own schedules. Every level's term
            is still the weighted mean over all the batch's tokens (the chunks' sums over the
            sums of their weights). A run of consecutive samples of one chunk is one slice (no
            gather); a micro-batch's samples come in global-batch order, so one slice per chunk.

    Returns:
        Scalar loss, float32 (computed in float32 even under autocast).
    """
    if chunks is None:
        chunks, schedules = [0] * pred.shape[0], {0: schedules}
    levels = {len(s) for s in schedules.values()}
    if len(levels) != 1:
        raise ValueError(f"every chunk needs the same number of levels, got {sorted(levels)}")
    _check_inputs(pred, target, distance, mask, next(iter(schedules.values())))
    if len(chunks) != pred.shape[0]:
        raise ValueError(
            f"chunks must hold one entry per sample ({pred.shape[0]}), got {len(chunks)}"
        )
    runs = [(0, 0, next(iter(schedules.values())))] if len(chunks) == 0 else []
    start = 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i] != chunks[start]:
            runs.append((start, i, schedules[chunks[start]]))
            start = i
    with torch.autocast(pred.device.type, enabled=False):
        totals = None
        for a, b, levels in runs:
            terms = _dtm_terms(
                pred[a:b],
                target[a:b],
                levels,
                mode,
                distance,
                beta,
                normalize_target,
                None if mask is None else mask[a:b],
                per_group,
                generator,
            )
            totals = (
                terms
                if totals is None
                else [(n0 + n1, d0 + d1) for (n0, d0), (n1, d1) in zip(totals, terms)]
            )
        return torch.stack([num / den.clamp_min(1) for num, den in totals]).mean()


class DTMLoss(nn.Module):
    """DTM loss that draws its own dynamic schedules every call (docs/method.md 1.4, release
    scheduler).

    Example::

        criterion = DTMLoss(num_levels=2)
        loss = criterion(pred, target, mask=None)

    Args:
        num_levels: L, independent schedules per call (2 in the paper).
        n_max, k_max: scheduler bounds (default n_max = N of the input, k_max = 14).
        scheduler: "release" or "paper" (see :func:`tokenmorph.morph.sample_schedules`: the
            release draws the num_merge of every level, then the k of every level), or "none"
            for token-wise distillation.
        mode, distance, beta, normalize_target, per_group: as :func:`dtm_loss`.
        masked_only: use the ``mask`` passed to ``forward`` (else it is ignored: all tokens
            count).
        seed: seed of the module's own schedule RNG (reproducible runs); None uses the global
            RNG.
    """

    def __init__(
        self,
        num_levels: int = 2,
        n_max: int | None = None,
        k_max: int = 14,
        scheduler: str = "release",
        mode: str = "reference",
        distance: str = "smooth_l1",
        beta: float = 2.0,
        normalize_target: bool = False,
        per_group: bool = False,
        masked_only: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {tuple(DISTANCES)}, got {distance!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.num_levels, self.n_max, self.k_max = num_levels, n_max, k_max
        self.scheduler, self.mode = scheduler, mode
        self.distance, self.beta = distance, beta
        self.normalize_target, self.per_group, self.masked_only = (
            normalize_target,
            per_group,
            masked_only,
        )
        self.rng = _random.Random(seed) if seed is not None else None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.last_schedules: list[list[int]] = []
        self.last_chunk_schedules: dict = {}

    def sample_schedules(self, num_tokens: int, rng=None) -> list[list[int]]:
        """L schedules from ``rng`` (a random.Random / torch.Generator), else the module's own
           RNG.
        ``scheduler="none"`` gives token-wise distillation (no merging)."""
        if self.scheduler == "none":
            return [[] for _ in range(self.num_levels)]
        rng = self.rng if rng is None else rng
        n_max = num_tokens if self.n_max is None else min(self.n_max, num_tokens)
        return sample_schedules(
            self.num_levels,
            num_tokens,
            n_max,
            self.k_max,
            self.scheduler,
            rng,
            protect_first=self.mode == "reference",
        )

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        rng=None,
        chunks: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """pred, target (B, N, D); mask (B, N) bool (used when ``masked_only``).

        Without ``chunks``: one set of L schedules for the batch, drawn from ``rng`` (else the
        module's own RNG). With ``chunks`` (B ints, the chunk of every sample): each chunk draws
        its own L schedules from ``rng(chunk)`` (``rng`` is then a callable chunk -> RNG), see
        :func:`dtm_loss`. ``last_schedules`` holds the schedules drawn, the
        chunks' one after the other (``last_chunk_schedules``: chunk -> its schedules).
        """
        if chunks is not None:
            if not callable(rng):
                raise ValueError("with chunks, rng must be a callable chunk -> random generator")
            schedules = {
                c: self.sample_schedules(pred.shape[1], rng(c)) for c in dict.fromkeys(chunks)
            }
            self.last_chunk_schedules = schedules
            self.last_schedules = [s for ss in schedules.values() for s in ss]
        else:
            schedules = self.last_schedules = self.sample_schedules(pred.shape[1], rng)
            self.last_chunk_schedules = {0: schedules}
        return dtm_loss(
            pred,
            target,
            schedules,
            mode=self.mode,
            distance=self.distance,
            beta=self.beta,
            normalize_target=self.normalize_target,
            mask=mask if self.masked_only else None,
            per_group=self.per_group,
            generator=self.generator,
            chunks=None if chunks is None else list(chunks),
        )

    def extra_repr(self) -> str:
        return (
            f"num_levels={self.num_levels}, scheduler={self.scheduler!r}, mode={self.mode!r}, "
            f"distance={self.distance!r}, beta={self.beta}"
        )


# --------------------------------------------------------------------------- pixel
# reconstruction
def patch_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MAE's loss: pred, target (B, N, D), mask (B, N) bool -> the per-token MSE (mean over D)
    averaged over the masked tokens (all tokens when ``mask`` is None)."""
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def zoom_in_mask_loss(
    pred: torch.Tensor,
    input_target: torch.Tensor,
    output_target: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    grid: int,
    ring: int,
    ring_weight: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """The best practice's loss (docs/method.md 2), as the zoomed-in release computes it.

    Args:
        pred: (B, grid^2, p*p*3) predictions on the output grid, which covers the whole zoom-in
            view (the view area-resized to the input side).
        input_target: (B, grid^2, p*p*3) normalised patches of the input frame (the view's centre
            crop) on its own grid: the masked term's targets.
        output_target: (B, grid^2, p*p*3) normalised patches of the output frame (the view
            area-resized to the input side) on the output grid: the ring term's targets, which
            the release normalises there, before mapping them to the view.
        mask: (B, grid^2) bool, the input's masked tokens.
        patch, grid, ring: patch side in pixels; input grid side and ring width, in patches.
        ring_weight: weight of the border-ring term (0.2); the masked-token term gets 1 -
            ring_weight.

    Prediction and output target are mapped to the view the same way (pixels, area
    interpolation to the view's side) and cut into the view's patches: the masked term is MAE's
    masked-token MSE of the centre (input-frame) patches against ``input_target``; the ring term
    adds the MSE of each of the four strips the input never saw against the mapped
    ``output_target``. Returns (loss, {"masked": ..., "ring": ...}), the two terms as detached
    0-dim tensors.
    """
    from .degrade import output_to_view, view_regions
    from .patches import patchify

    side = (grid + 2 * ring) * patch

    def to_view(tokens):
        return patchify(output_to_view(tokens.float(), patch, (grid, grid), side), patch)

    view_pred, view_target = to_view(pred), to_view(output_target)
    centre, strips = view_regions(grid, ring)
    centre, strips = centre.to(pred.device), [s.to(pred.device) for s in strips]
    masked = patch_mse(view_pred[:, centre], input_target, mask)
    border = sum(F.mse_loss(view_pred[:, s], view_target[:, s]) for s in strips)
    loss = (1 - ring_weight) * masked + ring_weight * border
    return loss, {"masked": masked.detach(), "ring": border.detach()}  # tensors: no host sync


def zoom_out_loss(
    pred: torch.Tensor,
    output_target: torch.Tensor,
    mask: torch.Tensor | None,
    patch: int,
    grid: tuple[int, int],
    content: int,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """The zoom-out release's loss: pred, output_target (B, N, p*p*3) on the output grid (the
    content area-resized to the canvas side, normalised there), mask (B, N) bool on the canvas
    grid (None = every token), offsets (B, 2) -> scalar.

    Both are mapped to the canvas (pixels, area-resize to ``content``, symmetric pad at the
    offsets: :func:`tokenmorph.ops.degrade.content_to_canvas`) and cut into canvas patches; the
    loss is the per-token MSE averaged over the masked canvas tokens.
    """
    from .degrade import content_to_canvas
    from .patches import patchify, unpatchify

    def to_canvas(tokens):
        img = unpatchify(tokens.float(), patch, grid, channels=tokens.shape[-1] // (patch * patch))
        return patchify(content_to_canvas(img, content, offsets), patch)

    return patch_mse(to_canvas(pred), to_canvas(output_target), mask)
