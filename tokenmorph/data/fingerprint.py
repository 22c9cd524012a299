"""A data set's fingerprint: enough to tell, cheaply, that the data of a run changed between its
start and a resume (files added, removed, renamed or rewritten).

* a folder of images: the file count, a hash of every relative file name (in the data set's
  order), and a hash of the sizes and first 64 KiB of :data:`SAMPLED_FILES` files spread evenly
  over the data set (reading every file of a large set on each resume would take minutes);
* Fashion-MNIST: the image count, the split, and a hash of every image and label;
* WebDataset shards: the sample count, a hash of the shard names and sizes, and a hash of the
  index (every sample's offset, size and label);
* WebDataset shards read as a stream (``wds:``): the sample and shard counts, a hash of every
  shard's name, size and sample count;
* a Hugging Face data set (``hfds:``; ``hfids:`` likewise, or a hash of its files' names and
  sizes when ``datasets`` has no fingerprint of them): the row count, the split and datasets' own
  fingerprint of the stored data;
* any other data set: its class name and length.

Hashes are the first 16 hex digits of SHA-256.
"""

from __future__ import annotations

import hashlib

from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST
from .folders import ImageFiles
from .hf import HFImages
from .shards import TarShards

__all__ = ["SAMPLED_FILES", "data_fingerprint", "describe_fingerprint"]

SAMPLED_FILES = 16
_HEAD_BYTES = 1 << 16


def _digest(h) -> str:
    return h.hexdigest()[:16]


def _folder_fingerprint(ds: ImageFiles) -> dict:
    names = hashlib.sha256()
    for path in ds.files:
        names.update(path.relative_to(ds.root).as_posix().encode() + b"\n")
    n = len(ds.files)
    picks = sorted({i * n // SAMPLED_FILES for i in range(SAMPLED_FILES)}) if n else []
    content = hashlib.sha256()
    for i in picks:
        try:
            with open(ds.files[i], "rb") as f:
                content.update(f"{i}:{ds.files[i].stat().st_size}:".encode() + f.read(_HEAD_BYTES))
        except OSError as e:  # unreadable now: the data changed, say so through the hash
            content.update(f"{i}:unreadable:{e.errno}".encode())
    return {"kind": "images", "count": n, "names": _digest(names), "sample": _digest(content)}


def _fashion_mnist_fingerprint(ds: FashionMNIST) -> dict:
    h = hashlib.sha256(ds.data.numpy().tobytes())
    h.update(ds.targets.numpy().tobytes())
    split = "train" if ds.train else "test"
    return {"kind": f"fashion-mnist {split}", "count": len(ds), "sample": _digest(h)}


def _shards_fingerprint(ds: TarShards) -> dict:
    names = hashlib.sha256()
    for path in ds.shards:
        try:
            size = path.stat().st_size
        except OSError as e:
            size = f"unreadable:{e.errno}"
        names.update(f"{path.name}:{size}\n".encode())
    index = hashlib.sha256(ds._offset.tobytes() + ds._size.tobytes())
    index.update(repr(ds.targets).encode())
    kind = f"shards {ds.split}"
    return {"kind": kind, "count": len(ds), "names": _digest(names), "sample": _digest(index)}


def data_fingerprint(dataset: Dataset) -> dict:
    """A JSON-ready fingerprint of ``dataset`` (see the module docstring); equal fingerprints
    mean the same data, as far as these checks see."""
    if isinstance(dataset, ImageFiles):
        return _folder_fingerprint(dataset)
    if isinstance(dataset, FashionMNIST):
        return _fashion_mnist_fingerprint(dataset)
    if isinstance(dataset, TarShards):
        return _shards_fingerprint(dataset)
    if getattr(dataset, "streaming", False):  # wds:, hfids: (their own)
        return dataset.fingerprint()
    if isinstance(dataset, HFImages):
        kind = f"hfds {dataset.split}"
        return {"kind": kind, "count": len(dataset), "sample": dataset.hf_fingerprint}
    return {"kind": type(dataset).__name__, "count": len(dataset)}


def describe_fingerprint(fp: dict) -> str:
    """'40 images (names 1a2b3c4d..., contents 5e6f...)' for messages."""
    hashes = ", ".join(f"{k} {fp[k][:8]}" for k in ("names", "sample") if k in fp)
    return f"{fp.get('count')} {fp.get('kind')}" + (f" ({hashes})" if hashes else "")
