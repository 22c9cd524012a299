"""Beyond Masking degradations (docs/method.md 2): seeded, batched transforms of [0, 1] images.

Each pre-training objective is a :class:`Degradation`. It says

* what the data loader crops (``view_side``: the input side, or the larger zoom-in view),
* which random parameters each sample gets (``sample(rng)``, drawn in the data loader from the
  sample's seeded generator, so a resumed or multi-process run sees the same ones) and which each
  step gets (``step_params(rng)``, one draw per optimiser step for the whole global batch),
* and, in ``apply``, what the model sees (``inputs``, the input frame) and the clean image of the
  frame it predicts (``target``, the output frame). Both are (B, 3, S, S) with S the student's
  input side.

The transforms themselves are pure functions (``zoom_in``, ``zoom_out``, ``radial_distort``,
``random_blur``, ``decolorize``) with their shapes in the docstrings. The misaligned best
practice (``zoom_in_mask``) also needs the prediction mapped back to the view:
:func:`output_to_view` and :func:`view_regions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .patches import resize, unpatchify

__all__ = [
    "OBJECTIVES",
    "DEGRADATIONS",
    "Degraded",
    "Degradation",
    "build_degradation",
    "zoom_in",
    "zoom_out",
    "radial_distort",
    "random_blur",
    "decolorize",
    "output_to_view",
    "view_regions",
    "default_zoom_out_content",
]


# ------------------------------------------------------------------------------------ pure
# transforms
def zoom_in(view: torch.Tensor, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom-in misalignment. view (B, C, V, V) -> (inputs, target), each (B, C, S, S) with S = V
       - 2
    ring:
    the input is the view's centre S crop, the target is the *whole* view resized to S (so an
    output token covers V / S times the side of an input token: 9/7 for 288 / 224)."""
    V = view.shape[-1]
    S = V - 2 * ring
    if ring <= 0 or S <= 0:
        raise ValueError(
            f"zoom-in ring must be in (0, {V // 2}) pixels for a {V}px view, got {ring}"
        )
    return view[..., ring : ring + S, ring : ring + S], resize(view, (S, S))


def zoom_out(images: torch.Tensor, content: int, offset: tuple[int, int]) -> torch.Tensor:
    """Zoom-out: images (B, C, S, S) -> (B, C, S, S) canvas holding the image resized to
           ``content``
    pixels with its top-left corner at ``offset`` = (x, y) and mirror padding (reflection without
    repeating the edge pixel) everywhere else. The clean target is the image itself (the
    content's own frame at S pixels)."""
    S = images.shape[-1]
    x, y = offset
    if not (0 < content < S and 0 <= x <= S - content and 0 <= y <= S - content):
        raise ValueError(
            f"zoom-out content {content} at offset {offset} does not fit a {S}px canvas"
        )
    if S - content >= content:
        raise ValueError(f"zoom-out content {content} is too small to mirror-pad to {S}px")
    small = resize(images, (content, content))
    return F.pad(small, (x, S - content - x, y, S - content - y), mode="reflect")


def radial_distort(
    images: torch.Tensor, centre: torch.Tensor, strength: torch.Tensor
) -> torch.Tensor:
    """Radial warp: images (B, C, H, W), centre (B, 2) as (x, y) in [-1, 1], strength (B,) -> (B,
           C,
    H, W).

    The output pixel at normalised coordinate g (pixel centres, ``align_corners=False``) samples
    the input at g + (c - g) |c - g| m, bilinearly. For |c|, |g| <= 1 and m < 1 / (2 sqrt 2) that
    point lies between g and c, so it never leaves the image."""
    B, _, H, W = images.shape
    ys = (torch.arange(H, device=images.device, dtype=torch.float32) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=images.device, dtype=torch.float32) + 0.5) / W * 2 - 1
    g = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(
        B, H, W, 2
    )  # (B, H, W, 2) as (x, y)
    d = centre.float().view(B, 1, 1, 2) - g
    src = g + d * d.norm(dim=-1, keepdim=True) * strength.float().view(B, 1, 1, 1)
    return F.grid_sample(
        images, src.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def random_blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-image channel-mixing blur: images (B, C, H, W), kernels (B, C, C, k, k) -> (B, C, H,
           W).

    out[b, o] = sum_i (kernels[b, o, i] * images[b, i]) / C: every output channel filters and
    mixes all input channels; dividing by C keeps an expected unit gain for weights of mean 1 /
    k^2 (a sum would triple the brightness). Borders are mirror padded. One grouped convolution
    for the whole batch."""
    B, C, H, W = images.shape
    k = kernels.shape[-1]
    if kernels.shape != (B, C, C, k, k) or k % 2 == 0:
        raise ValueError(
            f"kernels must be (B, C, C, k, k) = ({B}, {C}, {C}, k, k) with odd k, got "
            f"{tuple(kernels.shape)}"
        )
    x = F.pad(images.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    out = F.conv2d(x, kernels.reshape(B * C, C, k, k).to(images.dtype) / C, groups=B)
    return out.reshape(B, C, H, W)


def decolorize(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One grey channel with random weights: images (B, 3, H, W), weights (3,) -> (B, 1, H, W) =
    w_R R + w_G G + w_B B."""
    return torch.einsum("bchw,c->bhw", images, weights.to(images.dtype)).unsqueeze(1)


# ------------------------------------------------------------------------------- zoom-in
# geometry
def output_to_view(
    pred: torch.Tensor, patch: int, grid: tuple[int, int], view_side: int
) -> torch.Tensor:
    """Map output-frame predictions back onto the zoom-in view: (B, N, p*p*C) tokens of the
           output
    grid (which covers the whole view) -> (B, C, V, V) pixels, by area interpolation
    (docs/method.md 2)."""
    img = unpatchify(pred, patch, grid, channels=pred.shape[-1] // (patch * patch))
    return F.interpolate(img, size=(view_side, view_side), mode="area")


def view_regions(grid: int, ring: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Token indices on the view's patch grid of side ``grid + 2 ring`` (``ring`` in patches):
    (centre, [top, bottom, left, right]). The centre grid x grid tokens, in row-major order, are
    the input frame's tokens; the four strips are the border ring the input never saw (top and
    bottom span the full width, corners included; left and right span the centre rows)."""
    G = grid + 2 * ring
    rows, cols = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    inner_r = (rows >= ring) & (rows < ring + grid)
    inner_c = (cols >= ring) & (cols < ring + grid)
    centre = torch.nonzero(inner_r & inner_c).squeeze(1)
    strips = [
        torch.nonzero(rows < ring).squeeze(1),
        torch.nonzero(rows >= ring + grid).squeeze(1),
        torch.nonzero(inner_r & (cols < ring)).squeeze(1),
        torch.nonzero(inner_r & (cols >= ring + grid)).squeeze(1),
    ]
    return centre, strips


def default_zoom_out_content(img_size: int) -> int:
    """Zoom-out content side: 5/7 of the canvas (160 at 224, docs/method.md 2)."""
    return round(img_size * 5 / 7)


# -------------------------------------------------------------------------------------
# objectives
@dataclass
class Degraded:
    """What one objective makes of a batch.

    Attributes:
        inputs: (B, 3, S, S) the image the student sees (before masking).
        target: (B, 3, S, S) the clean image of the frame the student predicts.
        view: (B, 3, V, V) the zoom-in view (misaligned objectives), else None.
    """

    inputs: torch.Tensor
    target: torch.Tensor
    view: torch.Tensor | None = None


@dataclass
class Degradation:
    """The identity degradation (plain masking); subclasses below are the Beyond Masking
    objectives.

    Attributes:
        name: one of :data:`OBJECTIVES`.
        img_size: S, the student's input side.
        patch_size: the student's patch side.
        masked: whether the student's input is also masked (the loss then covers the masked
            tokens).
    """

    name: str
    img_size: int
    patch_size: int
    masked: bool = True

    @property
    def view_side(self) -> int:
        """Side of the crop the data loader makes."""
        return self.img_size

    @property
    def aligned(self) -> bool:
        """Whether the output frame is the input frame."""
        return True

    def sample(self, rng: np.random.Generator) -> dict:
        """Per-sample parameters (NumPy arrays), drawn in the data loader."""
        return {}

    def step_params(self, rng: np.random.Generator) -> dict:
        """Per-step parameters, one draw for the whole global batch."""
        return {}

    def apply(self, images: torch.Tensor, params: dict) -> Degraded:
        """images (B, 3, view_side, view_side) in [0, 1] -> :class:`Degraded`."""
        return Degraded(images, images)


@dataclass
class ZoomIn(Degradation):
    """View = RandomResizedCrop(S + 2 ring) in the loader; input = its centre S crop; output grid
    over the whole view. ``ring_patches`` = ring width in patches (2 at 224 / 16: the 288 view)."""

    ring_patches: int = 2
    masked: bool = False

    @property
    def ring(self) -> int:
        return self.ring_patches * self.patch_size

    @property
    def view_side(self) -> int:
        return self.img_size + 2 * self.ring

    @property
    def aligned(self) -> bool:
        return False

    def apply(self, images, params):
        inputs, target = zoom_in(images, self.ring)
        return Degraded(inputs, target, view=images)


@dataclass
class ZoomInMask(ZoomIn):
    """The best practice: zoom-in plus random masking of the input (loss:
    :func:`tokenmorph.ops.losses.zoom_in_mask_loss`)."""

    masked: bool = True


@dataclass
class ZoomOut(Degradation):
    """The image shrunk to ``content`` (default 5/7 of S: 160 at 224) at a random offset per step
       in
    a mirror-padded S canvas; the output frame is the content's (the clean image)."""

    content: int | None = None
    masked: bool = False

    def __post_init__(self):
        self.content = self.content or default_zoom_out_content(self.img_size)

    def step_params(self, rng):
        slack = self.img_size - self.content  # offsets 0 .. slack - 1 (0-63 px at 224)
        return {"offset": tuple(int(v) for v in rng.integers(0, max(slack, 1), size=2))}

    def apply(self, images, params):
        return Degraded(zoom_out(images, self.content, params["offset"]), images)


@dataclass
class Distort(Degradation):
    """Radial warp with centre c ~ U(-1, 1)^2 and strength m ~ U(strength) per sample."""

    strength: tuple[float, float] = (0.15, 0.25)
    masked: bool = False

    def sample(self, rng):
        return {
            "centre": rng.uniform(-1, 1, size=2).astype(np.float32),
            "strength": np.float32(rng.uniform(*self.strength)),
        }

    def apply(self, images, params):
        return Degraded(radial_distort(images, params["centre"], params["strength"]), images)


@dataclass
class Blur(Degradation):
    """A random 7 x 7 channel-mixing kernel per sample, weights ~ N(1/49, 0.02)."""

    kernel: int = 7
    std: float = 0.02
    masked: bool = False

    def sample(self, rng):
        k = self.kernel
        return {"kernel": rng.normal(1 / (k * k), self.std, size=(3, 3, k, k)).astype(np.float32)}

    def apply(self, images, params):
        return Degraded(random_blur(images, params["kernel"]), images)


@dataclass
class Decolorize(Degradation):
    """Grey input u1 R + u2 G + u3 B with u_i ~ U(0, max_weight) per step. The grey channel is
    repeated on the three input channels so the encoder stays a 3-channel backbone (the same as a
    1-channel patch embedding whose kernel is the sum of the three); the model reconstructs the
    colour image."""

    max_weight: float = 0.667
    masked: bool = False

    def step_params(self, rng):
        return {"weights": rng.uniform(0, self.max_weight, size=3).astype(np.float32)}

    def apply(self, images, params):
        w = torch.as_tensor(params["weights"], device=images.device)
        return Degraded(decolorize(images, w).expand(-1, 3, -1, -1), images)


# The objectives, by config name (``objective=``): the config's choices and help come from here.
DEGRADATIONS: dict[str, type[Degradation]] = {
    "mask": Degradation,
    "zoom_in": ZoomIn,
    "zoom_out": ZoomOut,
    "distort": Distort,
    "blur": Blur,
    "decolorize": Decolorize,
    "zoom_in_mask": ZoomInMask,
}
OBJECTIVES = tuple(DEGRADATIONS)


def build_degradation(name: str, img_size: int, patch_size: int, **options) -> Degradation:
    """The objective ``name`` (one of :data:`OBJECTIVES`) for S = ``img_size`` inputs.
       ``options``:
    ``ring_patches`` (zoom_in, zoom_in_mask), ``content`` (zoom_out)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    cls = DEGRADATIONS[name]
    known = {f for f in cls.__dataclass_fields__} - {"name", "img_size", "patch_size", "masked"}
    return cls(
        name=name,
        img_size=img_size,
        patch_size=patch_size,
        **{k: v for k, v in options.items() if k in known},
    )
