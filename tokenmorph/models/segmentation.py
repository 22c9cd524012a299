"""Segmentation models on a plain ViT: BEiT's UperNet (the ADE20K protocol of BEiT, BEiT v2,
MAE and DTM) and DINOv2's linear head.

* :class:`ViTFeatures`: the patch tokens of chosen blocks of a timm ``Beit`` or
  ``VisionTransformer`` as (B, D, h, w) maps (``forward_intermediates``), blocks after the last
  one and the classifier pruned so that every parameter gets a gradient (DDP needs that).
* :class:`MultiScaleNeck`: BEiT's adapter from one scale to four (strides 4, 8, 16, 32 px): for
  patch 16, x4 (two transposed convs with BatchNorm + GELU between), x2 (one), identity, /2
  (max-pool).
* :class:`UPerHead`: pyramid pooling (1, 2, 3, 6) on the coarsest level, FPN laterals and
  top-down sums, 3x3 convs, fusion of the four levels at the finest; Conv-BN-ReLU modules,
  dropout 0.1, a 1x1 classifier. :class:`FCNHead`: the auxiliary head on the third level.
* :class:`UperNetSegmentor`: backbone + neck + decode head (+ auxiliary head in training).
* :class:`LinearSegmentor`: DINOv2's linear probe: frozen normalised patch tokens of the last
  block (or the last four, concatenated) -> BatchNorm -> 1x1 conv.
* :func:`resize_rel_pos_table`: the release's cubic resampling of a relative position bias table
  to a larger window (BEiT's segmentation loader), next to timm's linear one.

Written from mmsegmentation's UPerHead / FCNHead / ConvModule and BEiT's backbone (read, not
copied); segmentation-models-pytorch's UPerNet is a different decoder (docs/segmentation.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.segmentation import resize_logits, segmentation_loss

__all__ = [
    "REL_POS_RESIZE",
    "CLASSIFIER_INITS",
    "default_out_indices",
    "ViTFeatures",
    "ConvBNReLU",
    "MultiScaleNeck",
    "UPerHead",
    "FCNHead",
    "UperNetSegmentor",
    "LinearSegmentor",
    "resize_rel_pos_table",
]

# How a relative position bias table is resampled to a larger window: the BEiT / BEiT v2
# segmentation release's cubic spline on the geometric grid, or timm's linear interpolation on
# the same grid (what tokenmorph's classification fine-tuning uses).
REL_POS_RESIZE = ("release", "timm")
# How the 1x1 classifiers of the heads start: mmseg's N(0, 0.01) (the releases), or PyTorch's
# default Conv2d init, whose larger weights pass more gradient to the layers below at the start
# (on the Fashion-MNIST proxy, mIoU 13% instead of 7% after 100 steps: for short runs).
CLASSIFIER_INITS = {
    "release": "N(0, 0.01) weights, zero bias (mmseg's conv_seg)",
    "default": "PyTorch's Conv2d init (Kaiming uniform): faster start in short runs",
}


def default_out_indices(depth: int) -> list[int]:
    """The four blocks UperNet reads, BEiT's rule: 3, 5, 7, 11 for 12 blocks (ViT-S/B), 7, 11,
    15, 23 for 24 (ViT-L) = the ends of the first 1/3, 1/2, 2/3 and all of the blocks; the same
    fractions for other depths (a block may serve two levels when the depth is below 6)."""
    return [max(depth * k // 12 - 1, 0) for k in (4, 6, 8, 12)]


class ViTFeatures(nn.Module):
    """The patch tokens after blocks ``indices`` of a timm ViT (``Beit`` or
    ``VisionTransformer``), each as a (B, D, H / p, W / p) map (the CLS token dropped).

    ``norm=False`` (UperNet, as BEiT's backbone): raw block outputs, the final norm removed.
    ``norm=True`` (DINOv2's probe): every map through the final LayerNorm. The classifier and
    the blocks after ``max(indices)`` are removed from ``vit``."""

    def __init__(self, vit: nn.Module, indices: Sequence[int], norm: bool = False) -> None:
        super().__init__()
        self.indices, self.norm = list(indices), norm
        self.unique = sorted(set(self.indices))
        depth = len(vit.blocks)
        if self.unique[0] < 0 or self.unique[-1] >= depth:
            raise ValueError(f"block indices {self.indices} outside the backbone's {depth} blocks")
        vit.prune_intermediate_layers(self.unique, prune_norm=not norm, prune_head=True)
        self.vit = vit
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.vit.forward_intermediates(
            x, indices=self.unique, norm=self.norm, output_fmt="NCHW", intermediates_only=True
        )
        by_index = dict(zip(self.unique, maps))
        return [by_index[i] for i in self.indices]


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule: Conv2d without bias (a norm follows) -> BatchNorm2d -> ReLU; the conv
    initialised Kaiming-normal (fan out, ReLU), the norm (1, 0)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn, relu = self
        x = conv(x)
        if (
            self.training
            and x.shape[0] * x.shape[2] * x.shape[3] == 1
            and type(bn) is nn.BatchNorm2d
        ):
            # one value per channel (the 1x1 pyramid level of a one-image batch, e.g. after a
            # skipped sample) has no batch statistics: normalise with the running ones instead
            # of failing; SyncBatchNorm pools the statistics over the processes instead
            x = F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        else:
            x = bn(x)
        return relu(x)


def _classifier(channels: int, num_classes: int, dropout: float, init: str = "release"):
    """mmseg's ``cls_seg``: Dropout2d then a 1x1 conv initialised N(0, 0.01), bias 0
    (``init="release"``; ``"default"``: PyTorch's init, see :data:`CLASSIFIER_INITS`)."""
    if init not in CLASSIFIER_INITS:
        raise ValueError(f"init must be one of {tuple(CLASSIFIER_INITS)}, got {init!r}")
    conv = nn.Conv2d(channels, num_classes, 1)
    if init == "release":
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


def _rescale(dim: int, factor: float) -> nn.Module:
    """One level of the neck: x2^k by k transposed convs (2x2, stride 2; BatchNorm + GELU
    between), identity for 1, /2^k by a 2^k max-pool."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        return nn.MaxPool2d(round(1 / factor), stride=round(1 / factor))
    layers: list[nn.Module] = []
    for k in range(round(math.log2(factor))):
        if k:
            layers += [nn.BatchNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, 2, stride=2))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class MultiScaleNeck(nn.Module):
    """One (B, D, h, w) map per level -> four maps at strides 4, 8, 16 and 32 pixels: BEiT's
    ``fpn1``-``fpn4``. For patch 16: x4 (two transposed convs with BatchNorm + GELU between),
    x2 (one), identity, /2 (max-pool): 128, 64, 32 and 16 for a 512 crop; for patch 8 BEiT's
    other variant (x2, identity, /2, /4); smaller patches pool more. The transposed convs keep
    PyTorch's default init, as the release."""

    def __init__(self, dim: int, patch_size: int = 16) -> None:
        super().__init__()
        if patch_size & (patch_size - 1) or patch_size > 64:
            raise ValueError(f"the neck needs a power-of-2 patch size up to 64, got {patch_size}")
        for i, stride in enumerate((4, 8, 16, 32)):
            self.add_module(f"fpn{i + 1}", _rescale(dim, patch_size / stride))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        ops = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [op(f) for op, f in zip(ops, feats)]


class UPerHead(nn.Module):
    """mmseg's UPerHead: four (B, D, ...) levels, finest first -> (B, K, h0, w0) logits at the
    finest level's size.

    PPM on the coarsest level (adaptive average pools 1, 2, 3, 6, each a 1x1 ConvBNReLU to
    ``channels``, bilinear back, concatenated with the level, a 3x3 ConvBNReLU) is the top of the
    pyramid; the three finer levels get 1x1 laterals; top-down, each lateral adds the bilinearly
    upsampled sum above it; 3x3 ConvBNReLUs on the three finer sums; all four resized to the
    finest, concatenated, a 3x3 ConvBNReLU; dropout; a 1x1 classifier. Resizes are bilinear with
    ``align_corners=False``."""

    def __init__(
        self,
        in_dim: int,
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        classifier_init: str = "release",
    ) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_dim, channels, 1))
            for s in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(in_dim, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in range(3))
        self.fuse = ConvBNReLU(4 * channels, channels, 3)
        self.classifier = _classifier(channels, num_classes, dropout, classifier_init)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[3]
        pooled = [resize_logits(branch(top), top.shape[-2:]) for branch in self.ppm]
        levels = [lat(f) for lat, f in zip(self.lateral, feats[:3])]
        levels.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down: the sums propagate
            levels[i - 1] = levels[i - 1] + resize_logits(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(levels[i]) for i, conv in enumerate(self.fpn)] + [levels[3]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize_logits(o, size) for o in outs], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """mmseg's FCNHead as BEiT's auxiliary head: one 3x3 ConvBNReLU ``in_dim`` -> ``channels``
    (256), dropout 0.1, a 1x1 classifier; no concatenation of the input."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        classifier_init: str = "release",
    ):
        super().__init__()
        self.conv = ConvBNReLU(in_dim, channels, 3)
        self.classifier = _classifier(channels, num_classes, dropout, classifier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class UperNetSegmentor(nn.Module):
    """BEiT's ADE20K model: :class:`ViTFeatures` (4 blocks, no final norm) ->
    :class:`MultiScaleNeck` -> :class:`UPerHead`, plus an :class:`FCNHead` on the third level
    (stride 16) weighted ``aux_weight`` (0.4) in the loss.

    ``forward(x)`` -> decode logits (B, K, H / 4, W / 4); ``forward(x, labels)`` ->
    (total loss, logs): each head's cross-entropy
    (:func:`tokenmorph.ops.segmentation.segmentation_loss`), so that DDP's wrapper sees the
    whole training computation in its forward."""

    def __init__(
        self,
        backbone: ViTFeatures,
        num_classes: int,
        channels: int | None = None,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        classifier_init: str = "release",
    ) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone, self.num_classes, self.aux_weight = backbone, num_classes, aux_weight
        self.neck = MultiScaleNeck(dim, backbone.patch_size)
        self.decode_head = UPerHead(
            dim, channels or dim, num_classes, dropout=dropout, classifier_init=classifier_init
        )
        self.aux_head = (
            FCNHead(dim, num_classes, aux_channels, dropout, classifier_init)
            if aux_weight > 0
            else None
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        levels = self.neck(self.backbone(x))
        logits = self.decode_head(levels)
        if labels is None:
            return logits
        decode = segmentation_loss(logits, labels)
        logs = {"loss_decode": decode.detach()}
        total = decode
        if self.aux_head is not None:
            aux = segmentation_loss(self.aux_head(levels[2]), labels)
            total = total + self.aux_weight * aux
            logs["loss_aux"] = aux.detach()
        return total, logs


class LinearSegmentor(nn.Module):
    """DINOv2's linear segmentation probe: the normalised patch tokens of ``features``'s blocks
    (the last; or the last four, bilinearly resized to the first and concatenated: 4D
    channels) -> BatchNorm2d -> 1x1 conv (N(0, 0.01), bias 0) -> (B, K, H / p, W / p) logits.
    The backbone is frozen: no gradient, always in eval mode."""

    def __init__(self, features: ViTFeatures, num_classes: int) -> None:
        super().__init__()
        features.requires_grad_(False)
        self.features = features
        dim = features.embed_dim * len(features.indices)
        self.bn = nn.BatchNorm2d(dim)
        self.classifier = _classifier(dim, num_classes, 0.0)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen: drop path off, BatchNorm-free anyway
        return self

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits (B, K, H / p, W / p); with ``labels``, (loss, logs) instead."""
        with torch.no_grad():
            maps = self.features(x)
        size = maps[0].shape[-2:]
        feats = torch.cat([resize_logits(m, size) for m in maps], dim=1).float()
        logits = self.classifier(self.bn(feats))
        return logits if labels is None else (segmentation_loss(logits, labels), {})


# ---------------------------------------------------------------------------------- rel-pos tables
def _geometric_offsets(src: int, dst: int) -> list[float]:
    """The release's source coordinates of a (src)-wide bias axis stretched over (dst) offsets:
    offsets 1, 1 + q, 1 + q + q^2, ... with q found by bisection on [1.01, 1.5] (to 1e-6) so
    that the src // 2 steps reach dst // 2; mirrored around 0."""
    lo, hi = 1.01, 1.5
    half, target = src // 2, dst // 2
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q**half) / (1 - q) > target:
            hi = q
        else:
            lo = q
    offsets, cur = [], 1.0
    for i in range(half):
        offsets.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(offsets)] + [0.0] + offsets


def resize_rel_pos_table(
    table: torch.Tensor, dst_window: tuple[int, int], method: str = "release"
) -> torch.Tensor:
    """A BEiT relative position bias table ((2h - 1)(2w - 1) + 3, heads) for a square source
    window -> the table of ``dst_window`` (the last 3 rows: CLS-to-token, token-to-CLS,
    CLS-to-CLS, kept as they are).

    ``method="release"``: BEiT's segmentation loader (``mmcv_custom/checkpoint.py``): each head's
    (2h - 1)^2 grid is placed on the geometric source coordinates of :func:`_geometric_offsets`
    and evaluated at the integer target offsets with an interpolating bicubic spline (SciPy's
    ``RectBivariateSpline(kx=ky=3, s=0)``, which is what the release's removed ``interp2d``
    computed on a regular grid). ``method="timm"``: timm's ``resize_rel_pos_bias_table`` (the
    same grid, linear interpolation). Unchanged when the window is the same."""
    if method not in REL_POS_RESIZE:
        raise ValueError(f"method must be one of {REL_POS_RESIZE}, got {method!r}")
    dst_h, dst_w = (2 * dst_window[0] - 1), (2 * dst_window[1] - 1)
    src = int(round((table.shape[0] - 3) ** 0.5))
    if src * src + 3 != table.shape[0]:
        raise ValueError(f"a table of {table.shape[0]} rows is not a square window's")
    if (src, src) == (dst_h, dst_w):
        return table
    if method == "timm":
        from timm.layers import resize_rel_pos_bias_table

        return resize_rel_pos_bias_table(
            table, new_window_size=dst_window, new_bias_shape=(dst_h * dst_w + 3, table.shape[1])
        )
    try:
        from scipy.interpolate import RectBivariateSpline
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rel_pos_resize=release needs SciPy (pip install scipy); or use rel_pos_resize=timm"
        ) from None
    ys, xs = _geometric_offsets(src, dst_h), _geometric_offsets(src, dst_w)
    ty = torch.arange(-(dst_h // 2), dst_h // 2 + 1, dtype=torch.float64).numpy()
    tx = torch.arange(-(dst_w // 2), dst_w // 2 + 1, dtype=torch.float64).numpy()
    grid = table[:-3].double().cpu().numpy()
    heads = []
    for h in range(table.shape[1]):
        z = grid[:, h].reshape(src, src)
        heads.append(torch.from_numpy(RectBivariateSpline(ys, xs, z, kx=3, ky=3, s=0)(ty, tx)))
    out = torch.stack(heads, dim=-1).reshape(dst_h * dst_w, -1)
    return torch.cat([out.to(table), table[-3:]], dim=0)
