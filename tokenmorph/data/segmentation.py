"""Semantic segmentation data: image + class-index mask pairs, mmsegmentation's joint
augmentations, and a Fashion-MNIST proxy set.

Data sets (items ``(image, mask)`` through ``transform(image, mask, rng)``, or ``None`` for a bad
pair, which :func:`tokenmorph.data.collate_skip` drops and counts):

* :func:`ade20k_dataset`: the ADE20K release layout ``ADEChallengeData2016/images/{training,
  validation}/*.jpg`` + ``annotations/{training,validation}/*.png``, with "reduce zero label"
  (0 = "other objects" -> 255, ignored; 1..150 -> 0..149).
* :func:`generic_dataset`: users' own data, ``ROOT/images/*`` + ``ROOT/masks/*.png`` (same stems,
  class indices, 255 = ignore) and an optional ``ROOT/classes.txt`` (one name per line).
* :class:`FashionMNISTCanvases`: a deterministic proxy for dense prediction made from
  Fashion-MNIST (docs/segmentation.md): NOT a substitute for ADE20K.

A bad pair (an image without a mask, a mask of another size, a file that does not decode, a
colour mask, a label outside the classes) is skipped and counted, or, with
``on_bad_image="raise"``, raises ``DataError`` naming the file.

Transforms are pure functions of (image, mask, NumPy generator): :class:`SegTrainTransform` is
mmseg's ADE20K training pipeline (random rescale of (2048, 512) by 0.5-2.0 keeping the aspect
ratio, random crop with a maximum category ratio, flip, photometric distortion, normalisation,
padding with 255), :class:`SegEvalTransform` its test pipeline. The data sets draw each item's
generator from torch's global RNG, which :class:`tokenmorph.runtime.sampling.KeyedDataset` seeds
from (seed, epoch, index): augmentations are reproducible wherever a sample is loaded, and a
resumed run sees exactly the same crops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..ops.segmentation import IGNORE_INDEX
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from .folders import IMAGE_EXTENSIONS
from .images import check_on_error, open_rgb, skip_or_raise

__all__ = [
    "IGNORE_INDEX",
    "ADE20K_DIR",
    "ADE20K_CLASSES",
    "PROXY_CLASSES",
    "PROXY_NAME",
    "reduce_zero_label",
    "SegmentationPairs",
    "ade20k_dataset",
    "generic_dataset",
    "FashionMNISTCanvases",
    "segmentation_datasets",
    "rescale_size",
    "resize_pair",
    "random_crop",
    "photometric_distortion",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "normalize_pad",
    "SegTrainTransform",
    "SegEvalTransform",
    "item_rng",
]

PathLike = Union[str, os.PathLike]

ADE20K_DIR = "ADEChallengeData2016"
ADE20K_SPLITS = {True: "training", False: "validation"}
# The 150 classes of ADE20K's scene-parsing benchmark in label order (label = index + 1 in the
# PNGs): the first name of each line of the release's objectInfo150.txt (CSAILVision/sceneparsing).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip
PROXY_NAME = "fashion-mnist-seg"
PROXY_CLASSES = ("background", *FASHION_MNIST_CLASSES)
# mmseg's ADE20K pipeline constants (configs/_base_/datasets/ade20k.py, PhotoMetricDistortion)
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """ADE20K's label convention: 0 ("other objects") -> 255 (ignored), v -> v - 1, 255 stays
    255. (H, W) uint8 -> (H, W) uint8."""
    out = mask.astype(np.int16) - 1
    out[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def item_rng() -> np.random.Generator:
    """A NumPy generator for one item, drawn from torch's global RNG (which ``KeyedDataset``
    seeds from (seed, epoch, index) before every item)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ())))


# ---------------------------------------------------------------------------------- pair folders
@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    }


def _pairs(images: Path, masks: Path, on_bad_image: str) -> tuple[list[Pair], list[Path]]:
    """(pairs matched by file stem, images without a mask); ``DataError`` for a missing folder,
    for no pair at all, or (``on_bad_image="raise"``) for the first image without a mask."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise DataError(f"segmentation data: {folder} is not a folder")
    imgs, msks = _files_by_stem(images, IMAGE_EXTENSIONS), _files_by_stem(masks, (".png",))
    missing = [p for stem, p in imgs.items() if stem not in msks]
    if missing and on_bad_image == "raise":
        raise DataError(
            f"{missing[0]} has no mask {masks / (missing[0].stem + '.png')} ({len(missing)} "
            "images without masks); add them or use on_bad_image=skip"
        )
    pairs = [Pair(p, msks[stem]) for stem, p in imgs.items() if stem in msks]
    if not pairs:
        raise DataError(
            f"no image of {images} has a mask of the same name in {masks} (class-index PNGs)"
        )
    return pairs, missing


class SegmentationPairs(Dataset):
    """Image files with class-index PNG masks.

    ``ds[i]`` -> ``transform(image (H, W, 3) uint8 RGB, mask (H, W) uint8, rng)`` (default: the
    two arrays), or ``None`` for a bad pair (``on_bad_image="skip"``, logged) / ``DataError``
    (``"raise"``). Masks are single-channel (mode L or P); with ``reduce_zero_label`` they are
    mapped by :func:`reduce_zero_label`; any value other than 255 must then be a class index.

    Attributes: ``pairs``, ``classes``, ``num_missing`` (images dropped for want of a mask, see
    :func:`_pairs`), ``reduce_zero_label``, ``transform``.
    """

    def __init__(
        self,
        pairs: list[Pair],
        classes: Sequence[str],
        reduce_zero_label: bool = False,
        transform: Callable | None = None,
        on_bad_image: str = "skip",
        num_missing: int = 0,
    ) -> None:
        check_on_error(on_bad_image, "on_bad_image")
        self.pairs, self.classes = list(pairs), list(classes)
        self.reduce_zero_label, self.transform = reduce_zero_label, transform
        self.on_bad_image, self.num_missing = on_bad_image, num_missing

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask (H, W) uint8 after the label mapping), or ``DataError``
        naming the file and what is wrong with it."""
        pair = self.pairs[index]
        image = np.array(open_rgb(pair.image))  # a writable copy: torch shares its memory later
        try:
            with Image.open(pair.mask) as im:
                im.load()
                mode = im.mode
                mask = np.array(im)
        except Exception as e:  # PIL raises many types for a bad file
            raise DataError(f"cannot decode mask {pair.mask}: {type(e).__name__}: {e}") from e
        if mask.ndim != 2 or mode not in ("L", "P"):
            raise DataError(
                f"mask {pair.mask} is a {mode} image; masks are single-channel class-index PNGs"
            )
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask)
        bad = mask[(mask != IGNORE_INDEX) & (mask >= len(self.classes))]
        if bad.size:
            raise DataError(
                f"mask {pair.mask} holds label {int(bad.max())}, outside the "
                f"{len(self.classes)} classes (255 = ignore)"
            )
        return image, mask

    def __getitem__(self, index: int):
        try:
            image, mask = self.load(index)
        except DataError as e:
            skip_or_raise(e, self.on_bad_image)
            return None
        if self.transform is None:
            return image, mask
        return self.transform(image, mask, item_rng())


def ade20k_root(root: PathLike) -> Path | None:
    """The ``ADEChallengeData2016`` folder at or inside ``root`` (or None)."""
    root = Path(root).expanduser()
    for candidate in (root, root / ADE20K_DIR):
        if (candidate / "images" / "training").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    return None


def ade20k_dataset(root: PathLike, train: bool, on_bad_image: str = "skip") -> SegmentationPairs:
    """One split of ADE20K in its release layout (``root`` is ``ADEChallengeData2016`` or its
    parent), 150 classes, reduce-zero-label on."""
    found = ade20k_root(root)
    if found is None:
        raise DataError(
            f"{root} is not an ADE20K folder: expected {ADE20K_DIR}/images/training and "
            "annotations/training"
        )
    split = ADE20K_SPLITS[bool(train)]
    pairs, missing = _pairs(found / "images" / split, found / "annotations" / split, on_bad_image)
    return SegmentationPairs(pairs, ADE20K_CLASSES, True, None, on_bad_image, len(missing))


def read_class_names(path: Path) -> list[str]:
    """One class name per non-empty line (``classes.txt``)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(names) > IGNORE_INDEX:
        raise DataError(f"{path} must list 1 to 255 class names, one per line")
    return names


def generic_dataset(
    root: PathLike,
    num_classes: int | None = None,
    reduce_zero: bool = False,
    on_bad_image: str = "skip",
) -> SegmentationPairs:
    """``root/images/*`` with ``root/masks/<same stem>.png``; class names from
    ``root/classes.txt`` (else ``class_0 ...`` for ``num_classes``)."""
    root = Path(root).expanduser()
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = read_class_names(names_file)
        if num_classes is not None and num_classes != len(classes):
            raise DataError(
                f"num_classes={num_classes} but {names_file} lists {len(classes)} classes"
            )
    elif num_classes is not None:
        classes = [f"class_{i}" for i in range(num_classes)]
    else:
        raise DataError(
            f"{root}: how many classes? Add {names_file} (one name per line) or set num_classes="
        )
    pairs, missing = _pairs(root / "images", root / "masks", on_bad_image)
    return SegmentationPairs(pairs, classes, reduce_zero, None, on_bad_image, len(missing))


# ---------------------------------------------------------------------------------- proxy set
class FashionMNISTCanvases(Dataset):
    """The Fashion-MNIST proxy for dense prediction (a stand-in for tests and CPU demos, NOT a
    substitute for ADE20K).

    Canvas ``i`` is a pure function of (split, i): a black ``canvas`` x ``canvas`` image holding
    2 to 4 Fashion-MNIST items of the split (training canvases from the training split,
    validation canvases from the test split), each resized (bilinear) from 28 px to a side drawn
    in [``min_side``, ``max_side``] and placed at a uniform position inside the canvas; later
    items lie on top. A pixel is labelled with its item's class + 1 where that item's intensity
    is above ``threshold`` (of 255), 0 (background) elsewhere: 11 classes
    (:data:`PROXY_CLASSES`). Below-threshold item pixels are blended with ``max`` so that items
    keep soft edges.

    ``ds[i]`` -> ``transform(image (S, S, 3) uint8 grey as RGB, mask (S, S) uint8, rng)``.
    """

    def __init__(
        self,
        root: PathLike | None = None,
        train: bool = True,
        size: int | None = None,
        canvas: int = 64,
        min_side: int = 16,
        max_side: int = 40,
        threshold: int = 32,
        transform: Callable | None = None,
    ) -> None:
        self.source = FashionMNIST(root, train=train)
        self.train, self.canvas, self.threshold = bool(train), canvas, threshold
        self.min_side, self.max_side = min_side, min(max_side, canvas)
        self.size = size if size is not None else (10000 if train else 1000)
        self.classes, self.transform, self.num_missing = list(PROXY_CLASSES), transform, 0

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (S, S, 3) uint8, mask (S, S) uint8) of canvas ``index``."""
        rng = np.random.default_rng([0x5E6, int(self.train), index])
        s = self.canvas
        image = np.zeros((s, s), np.uint8)
        mask = np.zeros((s, s), np.uint8)
        for _ in range(int(rng.integers(2, 5))):
            k = int(rng.integers(len(self.source)))
            side = int(rng.integers(self.min_side, self.max_side + 1))
            item = Image.fromarray(self.source.data[k].numpy()).resize((side, side), Image.BILINEAR)
            item = np.asarray(item)  # read only: combined into new arrays below
            y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            region, labels = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
            fg = item > self.threshold
            region[:] = np.where(fg, item, np.maximum(region, item))
            labels[fg] = int(self.source.targets[k]) + 1
        return np.repeat(image[..., None], 3, axis=2), mask

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask, item_rng())


def segmentation_datasets(
    data: str,
    val_data: str | None = None,
    num_classes: int | None = None,
    reduce_zero: bool = False,
    on_bad_image: str = "skip",
) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) of a data spec:

    * ``fashion-mnist-seg[:DIR]``: the proxy set (DIR: where the Fashion-MNIST files are);
    * an ADE20K folder (``ADEChallengeData2016`` or its parent): training / validation splits
      (``val_data`` ignored), 150 classes, reduce-zero-label;
    * a generic folder ``ROOT/images`` + ``ROOT/masks``: the training set; ``val_data`` another
      such folder (required).

    ``reduce_zero`` (generic layout only; ADE20K always has it) maps label 0 to ignore and v to v
    - 1. Transforms are unset (see :class:`SegTrainTransform`, :class:`SegEvalTransform`)."""
    name, _, folder = data.partition(":")
    if name == PROXY_NAME:
        train = FashionMNISTCanvases(folder or None, train=True)
        return train, FashionMNISTCanvases(folder or None, train=False), train.classes
    if ade20k_root(data) is not None:
        train = ade20k_dataset(data, True, on_bad_image)
        return train, ade20k_dataset(data, False, on_bad_image), train.classes
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(
            f"segmentation data {data} is not a folder: give the ADE20K folder, a folder with "
            f"images/ and masks/, or {PROXY_NAME}"
        )
    if not (root / "images").is_dir():
        raise DataError(
            f"segmentation data {data}: not {PROXY_NAME}, not an ADE20K folder ({ADE20K_DIR}/"
            "images/training), not a folder with images/ and masks/"
        )
    if val_data is None:
        raise DataError(
            f"no validation data for {data}: pass --val-data DIR (a folder with images/ and masks/)"
        )
    train = generic_dataset(root, num_classes, reduce_zero, on_bad_image)
    val = generic_dataset(val_data, len(train.classes), reduce_zero, on_bad_image)
    if not (Path(val_data).expanduser() / "classes.txt").is_file():
        val.classes = train.classes  # the names come from the training folder
    if val.classes != train.classes:
        raise DataError(f"the classes of {val_data} differ from those of {data}")
    return train, val, train.classes


# ---------------------------------------------------------------------------------- transforms
def rescale_size(height: int, width: int, scale: tuple[int | None, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest (h, w) with the long side <= ``scale[0]`` (None: no
    bound) and the short side <= ``scale[1]``; sides rounded half up."""
    long_edge, short_edge = scale
    factor = short_edge / min(height, width)
    if long_edge is not None:
        factor = min(factor, long_edge / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(
    image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image bilinearly (no antialiasing, rounded to uint8: OpenCV's INTER_LINEAR up to
    rounding) and the mask by nearest neighbour (OpenCV's INTER_NEAREST rule) to ``size``
    (h, w)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image, mask
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    image = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        mask = F.interpolate(m, size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()
    return image, mask


def random_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop: int,
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomCrop``: a crop x crop window at a uniform offset (smaller where the image
    is); with ``cat_max_ratio < 1`` the window is redrawn, up to ``tries`` times, until its
    labelled pixels hold more than one class and none covers ``cat_max_ratio`` or more of them
    (255 not counted); after the last redraw the window is taken unchecked."""
    h, w = mask.shape

    def draw():
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            labels, counts = np.unique(mask[y : y + crop, x : x + crop], return_counts=True)
            counts = counts[labels != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y : y + crop, x : x + crop], mask[y : y + crop, x : x + crop]


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> HSV in OpenCV's 8-bit convention (H in [0, 180) = degrees / 2,
    S and V in [0, 255]), as float32 (rounded values)."""
    x = image.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    d = v - x.min(axis=-1)
    safe = np.where(d > 0, d, 1.0)
    h = np.where(
        v == r,
        60 * (g - b) / safe,
        np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe),
    )
    h = np.where(d > 0, np.mod(h, 360), 0) / 2
    s = np.where(v > 0, 255 * d / np.where(v > 0, v, 1.0), 0)
    return np.stack([np.mod(np.rint(h), 180), np.rint(s), v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`: (H, W, 3) HSV (OpenCV 8-bit ranges) -> uint8 RGB."""
    h = hsv[..., 0].astype(np.float32) * 2 / 60  # sector in [0, 6)
    s, v = hsv[..., 1].astype(np.float32) / 255, hsv[..., 2].astype(np.float32)
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    m = v - c
    sector = np.floor(h).astype(np.int64) % 6
    zero = np.zeros_like(c)
    # (r, g, b) before adding m, per sector 0..5
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.zeros(hsv.shape, np.float32)
    for k, channels in enumerate(table):
        sel = sector == k
        for ch in range(3):
            rgb[..., ch][sel] = channels[ch][sel]
    return np.clip(np.rint(rgb + m[..., None]), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: x * alpha + beta in float32, clipped to [0, 255], truncated to
    uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on (H, W, 3) uint8 RGB, each step with probability 1/2:
    brightness (+U(-32, 32)); contrast (x U(0.5, 1.5)) either now or last (a coin decides);
    saturation (x U(0.5, 1.5) in HSV); hue (+ an integer in [-18, 18) in OpenCV's 0..180 hue);
    every step rounds down to uint8, as the release."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = bool(rng.integers(2))

    def contrast(img):
        return _convert(img, alpha=rng.uniform(*CONTRAST_RANGE)) if rng.integers(2) else img

    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = np.mod(
            hsv[..., 0].astype(np.int64) + rng.integers(-HUE_DELTA, HUE_DELTA), 180
        )
        image = hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def normalize_pad(
    image: np.ndarray,
    mask: np.ndarray | None,
    mean: Sequence[float],
    std: Sequence[float],
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, W, 3) uint8 -> (3, H', W') float32 ``(x / 255 - mean) / std``; mask -> (H', W')
    int64. With ``pad_to``, both are padded at the bottom and right to that side: the image with
    0 (the mean colour), the mask with 255 (mmseg's ``Pad(pad_val=0, seg_pad_val=255)``)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    m = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).long()
    if pad_to is not None:
        ph, pw = max(pad_to - x.shape[1], 0), max(pad_to - x.shape[2], 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            if m is not None:
                m = F.pad(m, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x, m


@dataclass
class SegTrainTransform:
    """mmseg's training pipeline for one pair, as a pure function of (image, mask, rng):
    random rescale (``scale`` x U[``ratio_range``), keep ratio), :func:`random_crop`, horizontal
    flip (``flip_prob``), :func:`photometric_distortion` (``photometric``), normalisation by the
    backbone's ``mean``/``std`` and padding to ``crop`` (mask 255). ``scale=(None, s)`` bounds
    only the short side (DINOv2's ``img_scale=(99999999, s)``).

    Returns ``(image (3, crop, crop) float32, mask (crop, crop) int64)``."""

    crop: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[int | None, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        long_edge, short_edge = self.scale
        target = (None if long_edge is None else int(long_edge * ratio), int(short_edge * ratio))
        image, mask = resize_pair(image, mask, rescale_size(*mask.shape, target))
        image, mask = random_crop(image, mask, self.crop, rng, self.cat_max_ratio)
        if rng.random() < self.flip_prob:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        return normalize_pad(image, mask, self.mean, self.std, self.crop)


@dataclass
class SegEvalTransform:
    """mmseg's single-scale test pipeline: the image rescaled (keep ratio) to fit ``scale``
    and normalised; the mask kept at the ORIGINAL size (metrics are computed there).

    Returns ``(image (3, h, w) float32, mask (H, W) int64)``."""

    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[int | None, int] = (2048, 512)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng=None):
        resized, _ = resize_pair(image, None, rescale_size(*mask.shape, self.scale))
        x, _ = normalize_pad(resized, None, self.mean, self.std)
        return x, torch.from_numpy(np.ascontiguousarray(mask)).long()
