"""Data: image decoding, data sets (Fashion-MNIST offline, folders of images), augmentations,
batching.

* :mod:`.images`: :func:`open_rgb` (any image file -> 8-bit RGB), :func:`load_image` (file,
  ``skimage:NAME``, ``fashion-mnist:N`` -> tensor), the scikit-image sample photos.
* :mod:`.fashion_mnist`: :class:`FashionMNIST` from its idx files.
* :mod:`.folders`: :class:`ImageFiles`, every image under a folder or an ImageFolder tree.
* :mod:`.shards`: WebDataset tar shards, written (``tokenmorph data shards``) and read by index.
* :mod:`.stream`: :class:`~.stream.ShardStream`, shards read as a stream (``wds:``) with a
  resumable position.
* :mod:`.hf`: :class:`~.hf.HFImages`, a local Hugging Face data set (``hfds:``).
* :mod:`.sources`: :func:`build_dataset` by name or path, :func:`dataset_stats`.
* :mod:`.fingerprint`: :func:`data_fingerprint`, what tells that a run's data changed.
* :mod:`.transforms`: :func:`pretrain_transform`, :func:`eval_transform`.
* :mod:`.collate`: :func:`collate_skip` (drops and counts undecodable items),
  :func:`seeded_subset`.
* :mod:`.segmentation`: image + mask pairs (ADE20K's layout, your own folders), mmseg's joint
  augmentations, the Fashion-MNIST proxy set for dense prediction.
"""

from ..errors import DataError
from .collate import collate_skip, seeded_subset
from .fashion_mnist import (
    CACHE_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIRS,
    FashionMNIST,
    find_fashion_mnist,
    read_idx,
)
from .fingerprint import data_fingerprint, describe_fingerprint
from .folders import IMAGE_EXTENSIONS, ImageFiles
from .images import (
    MAX_IMAGE_PIXELS,
    SAMPLE_PHOTOS,
    load_image,
    open_rgb,
    sample_photo,
    to_rgb,
    to_square_tensor,
)
from .sources import DATASET_STATS, build_dataset, data_folder, dataset_stats
from .transforms import (
    DEFAULT_CROP_PCT,
    TINY_IMAGE_SIDE,
    ToRGB,
    default_crop_pct,
    eval_transform,
    pretrain_transform,
    to_unit_float,
)

__all__ = [
    "DataError",
    "collate_skip",
    "seeded_subset",
    "CACHE_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "FashionMNIST",
    "find_fashion_mnist",
    "read_idx",
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "MAX_IMAGE_PIXELS",
    "SAMPLE_PHOTOS",
    "load_image",
    "open_rgb",
    "sample_photo",
    "to_rgb",
    "to_square_tensor",
    "data_fingerprint",
    "describe_fingerprint",
    "DATASET_STATS",
    "build_dataset",
    "data_folder",
    "dataset_stats",
    "DEFAULT_CROP_PCT",
    "TINY_IMAGE_SIDE",
    "ToRGB",
    "default_crop_pct",
    "eval_transform",
    "pretrain_transform",
    "to_unit_float",
]
