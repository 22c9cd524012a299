"""Semantic segmentation as tensor functions: the loss, the confusion matrix and its metrics
(mmsegmentation's rules, which the ADE20K numbers of BEiT, BEiT v2, MAE and DTM come from), and
sliding-window / whole-image inference.

Shapes: ``logits`` (B, K, h, w) at any stride, ``labels`` (B, H, W) int64 with classes in
[0, K) and ``ignore_index`` (255) for pixels that count nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "INFERENCE_MODES",
    "resize_logits",
    "segmentation_loss",
    "confusion_matrix",
    "segmentation_metrics",
    "slide_windows",
    "slide_inference",
    "whole_inference",
]

IGNORE_INDEX = 255
# how a validation image is turned into logits (mmseg's test_cfg mode)
INFERENCE_MODES = {
    "slide": "sliding window (crop, stride), logits averaged where windows overlap",
    "whole": "one forward pass of the image padded to the crop (images up to the crop size)",
}


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear with ``align_corners=False`` (mmseg's ``resize``);
    unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, K, h, w), upsampled to the labels' (B, H, W) size, in
    float32.

    Averaged over ALL B x H x W pixels, ignored ones included (they add 0): mmseg's
    ``CrossEntropyLoss`` before ``avg_non_ignore`` (0.23; the BEiT and DINOv2 configs use 0.11
    and 0.27 with it off), not PyTorch's mean over the valid pixels. A crop that is mostly
    padding therefore weighs less, as in the releases."""
    logits = resize_logits(logits, labels.shape[-2:]).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / labels.numel()


def confusion_matrix(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) int64 counts, row = ground truth, column = prediction, of the pixels whose label is
    a class (``ignore_index`` and anything outside [0, K) count nowhere; the data sets reject
    such values before they get here). ``pred`` and ``labels`` have the same shape; the counts
    stay on their device (one ``bincount``), so a whole validation set is summed there and
    all-reduced once."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    idx = labels[valid].long() * num_classes + pred[valid].long().clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor) -> dict:
    """mmseg's metrics of a summed (K, K) confusion matrix (row = ground truth), in float64.

    Per class c: IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN). A class neither in the
    ground truth nor predicted has IoU 0/0 = NaN; a class predicted but absent from the ground
    truth has IoU 0 and Acc 0/0 = NaN. ``mIoU`` and ``mAcc`` are the means over the non-NaN
    classes (NumPy's nanmean, as mmseg); ``aAcc`` is all TP over all labelled pixels. Returns
    fractions (not x100, not rounded): ``{"aAcc", "mIoU", "mAcc", "IoU": [K], "Acc": [K],
    "pixels": [K] labelled pixels per class}``, NaN entries as ``float("nan")``."""
    cm = cm.double().cpu()
    tp = cm.diagonal()
    label_area = cm.sum(dim=1)
    pred_area = cm.sum(dim=0)
    union = label_area + pred_area - tp
    iou = tp / union  # 0/0 -> NaN
    acc = tp / label_area
    total = float(label_area.sum())

    def nanmean(v: torch.Tensor) -> float:
        keep = ~torch.isnan(v)
        return float(v[keep].mean()) if keep.any() else float("nan")

    return {
        "aAcc": float(tp.sum()) / total if total else float("nan"),
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "pixels": [int(v) for v in label_area.tolist()],
    }


def slide_windows(
    height: int, width: int, crop: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """The windows ``(y1, y2, x1, x2)`` of mmseg's slide inference over an (height, width) image:
    ``max(H - crop + stride - 1, 0) // stride + 1`` rows (and columns), starts every ``stride``,
    the last one moved back so that it ends at the image's edge; a side shorter than ``crop``
    gets one window of that side. E.g. width 683, crop 512, stride 341: [0, 512) and
    [171, 683)."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def _padded_forward(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, crop: int
) -> torch.Tensor:
    """``logits_fn`` on ``x`` (N, 3, h, w), h and w <= crop, padded with zeros (the mean colour
    after normalisation) at the bottom and right to crop x crop: a backbone with a relative
    position bias (or a position embedding) is built for one grid. The logits are resized to the
    padded size, then cropped back to (h, w)."""
    h, w = x.shape[-2:]
    if (h, w) != (crop, crop):
        x = F.pad(x, (0, crop - w, 0, crop - h))
    return resize_logits(logits_fn(x), (crop, crop))[..., :h, :w]


def slide_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    crop: int,
    stride: int,
    max_windows: int = 8,
) -> torch.Tensor:
    """Logits of an image by mmseg's sliding window: ``image`` (B, 3, H, W) -> (B, K, H, W).

    Each window (:func:`slide_windows`) runs through ``logits_fn`` ((N, 3, crop, crop) ->
    (N, K, h', w') at any stride), its logits are resized (bilinear) to the window, summed into
    the image's frame and divided by the number of windows covering each pixel: raw logits are
    averaged, not probabilities. Windows smaller than the crop (a side shorter than ``crop``)
    are zero-padded to it (see :func:`_padded_forward`; mmseg feeds them unpadded, which a
    fixed-grid ViT cannot take). Up to ``max_windows`` windows per image run as one batch."""
    b, _, h, w = image.shape
    windows = slide_windows(h, w, crop, stride)
    total = count = None
    for start in range(0, len(windows), max_windows):
        chunk = windows[start : start + max_windows]
        sizes = {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in chunk}
        # windows of one size run together (they all do unless the image is smaller than a crop)
        for size in sorted(sizes):
            group = [win for win in chunk if (win[1] - win[0], win[3] - win[2]) == size]
            x = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])
            out = _padded_forward(logits_fn, x, crop).float()
            if total is None:
                total = out.new_zeros(b, out.shape[1], h, w)
                count = out.new_zeros(1, 1, h, w)
            for k, (y1, y2, x1, x2) in enumerate(group):
                total[:, :, y1:y2, x1:x2] += out[k * b : (k + 1) * b]
                count[:, :, y1:y2, x1:x2] += 1
    return total / count


def whole_inference(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, crop: int
) -> torch.Tensor:
    """Logits of an image from one forward pass: ``image`` (B, 3, H, W) with H, W <= ``crop``,
    zero-padded to the crop (the grid the backbone was built for) -> (B, K, H, W). ValueError for
    a larger image (use :func:`slide_inference`)."""
    h, w = image.shape[-2:]
    if h > crop or w > crop:
        raise ValueError(
            f"whole-image inference takes images up to the crop size {crop}, got {h}x{w}; use the "
            "sliding window"
        )
    return _padded_forward(logits_fn, image, crop).float()
