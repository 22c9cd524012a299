"""Beyond Masking degradations (docs/method.md 2): seeded, batched transforms of [0, 1] images.

Each pre-training objective is a :class:`Degradation`. It says

* what the data loader crops (``view_side``: the input side, the larger zoom-in view, or the
  smaller zoom-out content),
* which random parameters each sample gets (``sample(rng)``, drawn in the data loader from the
  sample's seeded generator, so a resumed or multi-process run sees the same ones) and which each
  chunk of the global batch gets (``step_params(rng)``, one draw per chunk of ``chunk_size``
  images at each step, seeded by (seed, step, chunk): the release draws them once per GPU batch),
* and, in ``apply``, what the model sees (``inputs``, the input frame) and the clean image of the
  frame it predicts (``target``, the output frame). Both are (B, 3, S, S) with S the student's
  input side, in the units of the loader's [0, 1] images: a degradation the release applies to
  the ImageNet-normalised image (distortion, blur, de-colorisation) normalises with the data
  set's ``mean`` / ``std``, degrades, and maps back, so that the student's own normalisation
  gives it exactly the release's input (which may leave [0, 1]).

The transforms themselves are pure functions (``zoom_in``, ``zoom_out``, ``radial_distort``,
``random_blur``, ``decolorize``, ``desaturate``) with their shapes in the docstrings. The
misaligned objectives also need the prediction mapped to another frame before the loss:
:func:`output_to_view` and :func:`view_regions` (zoom-in), :func:`content_to_canvas` (zoom-out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .patches import area_resize, normalize_image, unnormalize_image, unpatchify

__all__ = [
    "OBJECTIVES",
    "DEGRADATIONS",
    "Degraded",
    "Degradation",
    "build_degradation",
    "zoom_in",
    "zoom_out",
    "symmetric_pad",
    "content_to_canvas",
    "radial_distort",
    "random_blur",
    "decolorize",
    "desaturate",
    "output_to_view",
    "view_regions",
    "default_zoom_out_content",
]


# ------------------------------------------------------------------------------------ pure
# transforms
def zoom_in(view: torch.Tensor, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom-in misalignment. view (B, C, V, V) -> (inputs, target), each (B, C, S, S) with S = V
    - 2 ring: the input is the view's centre S crop, the target is the *whole* view area-resized
    to S (so an output token covers V / S times the side of an input token: 9/7 for 288 / 224).
    Area interpolation, as every resize of the release's loss."""
    V = view.shape[-1]
    S = V - 2 * ring
    if ring <= 0 or S <= 0:
        raise ValueError(
            f"zoom-in ring must be in (0, {V // 2}) pixels for a {V}px view, got {ring}"
        )
    return view[..., ring : ring + S, ring : ring + S], area_resize(view, S)


def symmetric_pad(images: torch.Tensor, canvas: int, offsets: torch.Tensor) -> torch.Tensor:
    """images (B, C, c, c) -> (B, C, canvas, canvas) with image b's top-left corner at
    ``offsets[b]`` = (x, y) and symmetric padding everywhere else (``np.pad(mode="symmetric")``:
    the border is mirrored *with* its edge pixel, as the zoom-out release fills its canvas).
    One gather per axis for the whole batch (each sample its own offset)."""
    B, C, c, _ = images.shape
    offsets = torch.as_tensor(offsets, device=images.device).long().view(B, 2)
    if canvas - c > c or bool((offsets < 0).any() or (offsets > canvas - c).any()):
        raise ValueError(
            f"zoom-out content {c} at offsets {offsets.tolist()} does not fit a {canvas}px canvas "
            "(each pad at most the content side)"
        )
    pos = torch.arange(canvas, device=images.device)

    def source(off):  # (B, canvas) content index of every canvas index, mirrored at both ends
        i = pos.view(1, -1) - off.view(-1, 1)
        i = torch.where(i < 0, -i - 1, i)
        return torch.where(i >= c, 2 * c - 1 - i, i)

    rows, cols = source(offsets[:, 1]), source(offsets[:, 0])
    out = images.gather(2, rows.view(B, 1, canvas, 1).expand(B, C, canvas, c))
    return out.gather(3, cols.view(B, 1, 1, canvas).expand(B, C, canvas, canvas))


def zoom_out(content: torch.Tensor, canvas: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zoom-out input: content (B, C, c, c) (the loader's crop, straight at the content side) ->
    (B, C, canvas, canvas), each image at its offset (x, y) in a symmetrically padded canvas
    (:func:`symmetric_pad`)."""
    return symmetric_pad(content, canvas, offsets)


def content_to_canvas(images: torch.Tensor, content: int, offsets: torch.Tensor) -> torch.Tensor:
    """The zoom-out release's map from the output frame (the content stretched to S) to the
    canvas: (B, C, S, S) -> area-resize to ``content`` -> symmetric pad at ``offsets`` -> (B, C,
    S, S). The release applies it to both the target and the prediction before the loss."""
    return symmetric_pad(area_resize(images, content), images.shape[-1], offsets)


def radial_distort(
    images: torch.Tensor, centre: torch.Tensor, strength: torch.Tensor
) -> torch.Tensor:
    """Radial warp (the distortion release): images (B, C, H, W), centre (B, 2) as (x, y) in [-1,
    1], strength (B,) -> (B, C, H, W).

    The output pixel at g = (linspace(-1, 1, W)[j], linspace(-1, 1, H)[i]) samples the input at
    g + (c - g) |c - g| m, bilinearly with ``align_corners=True`` and zeros outside the image
    (the release warps the ImageNet-normalised image, so outside is the mean colour)."""
    B, _, H, W = images.shape
    ys = torch.linspace(-1, 1, H, device=images.device)
    xs = torch.linspace(-1, 1, W, device=images.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    g = torch.stack([gx, gy], dim=-1).expand(B, H, W, 2)  # (B, H, W, 2) as (x, y)
    d = centre.float().view(B, 1, 1, 2) - g
    src = g + d * d.norm(dim=-1, keepdim=True) * strength.float().view(B, 1, 1, 1)
    return F.grid_sample(
        images, src.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def random_blur(
    images: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image channel-mixing blur, ``Conv2d(C, C, k, padding=k // 2)`` with image b's own
    weights: images (B, C, H, W), kernels (B, C, C, k, k), bias (C,) or None -> (B, C, H, W).

    out[b, o] = sum_i kernels[b, o, i] * images[b, i] + bias[o] (cross-correlation, zero
    padding): every output channel sums all input channels, so weights of mean 1 / k^2 give a
    gain of about C (3), the release's evident intent. One grouped convolution for the batch."""
    B, C, H, W = images.shape
    k = kernels.shape[-1]
    if kernels.shape != (B, C, C, k, k) or k % 2 == 0:
        raise ValueError(
            f"kernels must be (B, C, C, k, k) = ({B}, {C}, {C}, k, k) with odd k, got "
            f"{tuple(kernels.shape)}"
        )
    weight = kernels.reshape(B * C, C, k, k).to(images.dtype)
    b = None if bias is None else bias.to(images.dtype).repeat(B)
    out = F.conv2d(images.reshape(1, B * C, H, W), weight, b, padding=k // 2, groups=B)
    return out.reshape(B, C, H, W)


def decolorize(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One grey channel with random weights: images (B, 3, H, W), weights (B, 3) or (3,) -> (B,
    1, H, W) = w_R R + w_G G + w_B B (not normalised to sum 1)."""
    w = weights.to(images.dtype)
    w = w.expand(images.shape[0], -1) if w.dim() == 1 else w
    return torch.einsum("bchw,bc->bhw", images, w).unsqueeze(1)


def desaturate(images: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation times ``factor`` with hue and value kept: (B, 3, H, W) [0, 1] -> (B, 3, H,
    W). In HSV every channel is V - V S f(H), so scaling S gives V - factor (V - x) with V the
    pixel's largest channel (the de-colorisation release's ``rgb2hsv(ratio=0.3)`` round trip,
    without its uint8 / 2-degree-hue quantisation)."""
    v = images.amax(dim=1, keepdim=True)
    return v - factor * (v - images)


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
    return area_resize(img, view_side)


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
        view: (B, 3, V, V) the zoom-in view (zoom_in, zoom_in_mask), else None.
        offsets: (B, 2) the content's (x, y) offsets in the canvas (zoom_out), else None.
    """

    inputs: torch.Tensor
    target: torch.Tensor
    view: torch.Tensor | None = None
    offsets: torch.Tensor | None = None


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
        mean, std: the data set's normalisation (the student's input statistics), for the
            degradations the release applies to the normalised image.
        aligned: (class) whether the output frame is the input frame.
    """

    name: str
    img_size: int
    patch_size: int
    masked: bool = True
    mean: Sequence[float] = tuple(IMAGENET_DEFAULT_MEAN)
    std: Sequence[float] = tuple(IMAGENET_DEFAULT_STD)
    aligned: ClassVar[bool] = True

    @property
    def view_side(self) -> int:
        """Side of the crop the data loader makes."""
        return self.img_size

    def sample(self, rng: np.random.Generator) -> dict:
        """Per-sample parameters (NumPy arrays), drawn in the data loader."""
        return {}

    def step_params(self, rng: np.random.Generator) -> dict:
        """Parameters of one chunk of the global batch at one step (NumPy arrays)."""
        return {}

    def apply(self, images: torch.Tensor, params: dict) -> Degraded:
        """images (B, 3, view_side, view_side) in [0, 1], params (per-sample and per-chunk
        values, each (B, ...)) -> :class:`Degraded`."""
        return Degraded(images, images)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_image(images, self.mean, self.std)

    def _unnormalized(self, images: torch.Tensor) -> torch.Tensor:
        return unnormalize_image(images, self.mean, self.std)


@dataclass
class ZoomIn(Degradation):
    """View = RandomResizedCrop(S + 2 ring) in the loader; input = its centre S crop; output grid
    over the whole view. ``ring_patches`` = ring width in patches (2 at 224 / 16: the 288 view)."""

    ring_patches: int = 2
    masked: bool = False
    aligned: ClassVar[bool] = False

    @property
    def ring(self) -> int:
        return self.ring_patches * self.patch_size

    @property
    def view_side(self) -> int:
        return self.img_size + 2 * self.ring

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
    """The release's zoom-out: the loader crops straight to ``content`` (default 5/7 of S: 160 at
    224), placed at a random offset (0 .. S - content - 1 per axis, one per chunk of the batch)
    in a symmetrically padded S canvas, which is then masked (75%). The output frame is the
    content area-resized to S; the pixel loss maps prediction and target back to the canvas
    (:func:`content_to_canvas`, :func:`tokenmorph.ops.losses.zoom_out_loss`)."""

    content: int | None = None
    masked: bool = True
    aligned: ClassVar[bool] = False

    def __post_init__(self):
        self.content = self.content or default_zoom_out_content(self.img_size)

    @property
    def view_side(self) -> int:
        return self.content

    def step_params(self, rng):
        slack = self.img_size - self.content  # left, then top: 0 .. slack - 1 (0-63 px at 224)
        return {"offset": rng.integers(0, max(slack, 1), size=2)}

    def apply(self, images, params):
        offsets = torch.as_tensor(params["offset"], device=images.device)
        canvas = zoom_out(images, self.img_size, offsets)
        return Degraded(canvas, area_resize(images, self.img_size), offsets=offsets)


@dataclass
class Distort(Degradation):
    """Radial warp of the normalised image with centre c ~ U(-1, 1)^2 and strength m ~
    U(strength) per sample (:func:`radial_distort`)."""

    strength: tuple[float, float] = (0.15, 0.25)
    masked: bool = False

    def sample(self, rng):
        return {
            "centre": rng.uniform(-1, 1, size=2).astype(np.float32),
            "strength": np.float32(rng.uniform(*self.strength)),
        }

    def apply(self, images, params):
        warped = radial_distort(self._normalized(images), params["centre"], params["strength"])
        return Degraded(self._unnormalized(warped), images)


@dataclass
class Blur(Degradation):
    """A random k x k channel-mixing kernel per sample, weights ~ N(1/k^2, weight_std), on the
    normalised image (:func:`random_blur`, gain about 3). The bias is PyTorch's default
    ``Conv2d(3, 3, k)`` draw, U(+-1 / sqrt(3 k^2)), made once per run from ``seed``: the release
    draws it once when its transform is built and never again."""

    kernel: int = 7
    weight_std: float = 0.02
    seed: int = 0
    masked: bool = False

    def __post_init__(self):
        bound = 1 / np.sqrt(3 * self.kernel * self.kernel)
        self.bias = np.random.default_rng(self.seed).uniform(-bound, bound, 3).astype(np.float32)

    def sample(self, rng):
        k = self.kernel
        return {
            "kernel": rng.normal(1 / (k * k), self.weight_std, size=(3, 3, k, k)).astype(np.float32)
        }

    def apply(self, images, params):
        bias = torch.as_tensor(self.bias, device=images.device)
        blurred = random_blur(self._normalized(images), params["kernel"], bias)
        return Degraded(self._unnormalized(blurred), images)


@dataclass
class Decolorize(Degradation):
    """Grey input u1 R + u2 G + u3 B of the *normalised* channels, u_i ~ U(0, max_weight) per
    chunk of the batch (not normalised to sum 1). The release first desaturates the image
    (``saturation``: HSV saturation x 0.3, so the target is the desaturated image; 1 = off).
    The grey channel is the student's normalised input on all three channels, so the encoder
    stays an RGB backbone: the same function as the release's 1-channel patch embedding with
    the sum of the three kernels (docs/fidelity.md)."""

    max_weight: float = 0.667
    saturation: float = 0.3
    masked: bool = False

    def step_params(self, rng):
        return {"weights": rng.uniform(0, self.max_weight, size=3).astype(np.float32)}

    def apply(self, images, params):
        clean = images if self.saturation == 1 else desaturate(images, self.saturation)
        w = torch.as_tensor(params["weights"], device=images.device)
        grey = decolorize(self._normalized(clean), w).expand(-1, 3, -1, -1)
        return Degraded(self._unnormalized(grey), clean)


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
    ``options`` (each passed only to the objectives that take it): ``ring_patches`` (zoom_in,
    zoom_in_mask), ``content`` (zoom_out), ``seed`` (blur's bias), ``saturation``
    (decolorize), ``mean`` / ``std`` (the input normalisation)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    cls = DEGRADATIONS[name]
    known = {f.name for f in fields(cls)} - {"name", "img_size", "patch_size", "masked"}
    return cls(
        name=name,
        img_size=img_size,
        patch_size=patch_size,
        **{k: v for k, v in options.items() if k in known and v is not None},
    )
