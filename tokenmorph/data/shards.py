"""WebDataset tar shards: writing them from a folder or Fashion-MNIST, and reading them as a
random-access data set.

Layout (WebDataset's, as timm's ``wds/`` reader and the ``webdataset`` package read it): shards
``{name}-{split}-{%06d}.tar``; a sample is the consecutive members sharing a key (the member
name up to the first dot of its base name): ``00000042.jpg`` (the image file's own bytes, or a
PNG for Fashion-MNIST) and, for labelled data, ``00000042.cls`` (the class index as ASCII); an
``_info.json`` in timm's format (``{"name", "splits": {split: {"num_samples", "filenames",
"shard_lengths"}}}``, plus the class names and each shard's byte size) is written last, once
every shard is complete. Next to each shard, ``NAME-SPLIT-NNNNNN.idx.npy`` records every sample's
data offset, size, place and label, so that reading needs no scan of the tar headers.

:class:`TarShards` takes the sidecar indexes (or, for shards written by other tools, indexes the
tar headers once: member offsets and sizes, no image decoded) and then reads any sample by
seeking into its shard: a map-style data set like a folder of images. So a run from shards keeps
everything a run from a folder has: the data order as a function of (seed, epoch), every sample
seeded by (seed, epoch, index), undecodable samples skipped and counted (or
``on_error="raise"``), and exact resume: a killed run resumes at its step's place in the order,
repeating and skipping nothing. :meth:`TarShards.position` names a sample's (shard, offset in the
shard).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .images import check_on_error, decode_rgb, skip_or_raise

__all__ = [
    "SHARD_INFO",
    "IMAGE_KEYS",
    "TarShards",
    "is_shard_folder",
    "load_sample",
    "read_split",
    "shard_split",
    "write_shards",
]


SHARD_INFO = "_info.json"  # timm's name (it also reads info.json)
# member extensions that hold the image, in the order of preference (WebDataset's usual ones)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


def is_shard_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of shards written by :func:`write_shards` (its info file)."""
    return path.is_dir() and (path / SHARD_INFO).is_file()


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/base.ext.more`` -> (``dir/base``, ``ext.more``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # no time: the same bytes every run
    tar.addfile(info, io.BytesIO(data))
    # the data ends the member, padded to whole blocks
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _index_path(shard: Path) -> Path:
    """The sidecar index of a shard: one (data offset, size, place, label) row per sample."""
    return shard.with_name(shard.name[: -len(".tar")] + ".idx.npy")


def write_shards(
    samples: Iterable[tuple[bytes, str, int]],
    out_dir: str | Path,
    name: str,
    split: str = "train",
    shard_size: int = 1000,
    classes: list[str] | None = None,
) -> dict:
    """Write ``samples`` (image file bytes, extension such as ``"jpg"``, label; -1 = no label)
    as tar shards of ``shard_size`` samples into ``out_dir`` and record them in its
    ``_info.json`` (other splits already there are kept; this split's old shards are replaced).
    Each shard is written under a temporary name and renamed when complete; the info file last.
    Returns this split's info entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / SHARD_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"name": name}
    filenames, lengths, sizes = [], [], []
    tar, rows, count = None, [], 0

    def close():
        nonlocal tar, rows
        if tar is not None:
            tar.close()
            final = out_dir / filenames[-1]
            index = _index_path(final)
            with open(index.with_suffix(".tmp"), "wb") as f:
                np.save(f, np.array(rows, dtype=np.int64).reshape(-1, 4))
            os.replace(final.with_suffix(".tmp"), final)
            os.replace(index.with_suffix(".tmp"), index)  # both opened by open(): umask modes
            sizes.append(final.stat().st_size)
            tar, rows = None, []

    for i, (data, ext, label) in enumerate(samples):
        if tar is None or lengths[-1] == shard_size:
            close()
            filenames.append(f"{name}-{split}-{len(filenames):06d}.tar")
            tar = tarfile.open(out_dir / Path(filenames[-1]).with_suffix(".tmp"), "w")
            lengths.append(0)
        key = f"{i:08d}"
        offset = _add(tar, f"{key}.{ext}", data)
        if label >= 0:
            _add(tar, f"{key}.cls", str(int(label)).encode())
        rows.append((offset, len(data), lengths[-1], int(label) if label >= 0 else -1))
        lengths[-1] += 1
        count += 1
    close()
    if not count:
        raise DataError(f"no samples to write into {out_dir}")
    for old in out_dir.glob(f"{name}-{split}-*.tar"):  # shards of an earlier, larger write
        if old.name not in filenames:
            old.unlink()
            _index_path(old).unlink(missing_ok=True)
    entry = {
        "name": split,
        "num_samples": count,
        "filenames": filenames,
        "shard_lengths": lengths,
        "shard_bytes": sizes,  # tokenmorph's: a shard's sidecar index is used only if it matches
    }
    if classes:
        entry["classes"] = list(classes)
    info.setdefault("splits", {})[split] = entry
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, info_path)
    return entry


def folder_samples(dataset) -> Iterator[tuple[bytes, str, int]]:
    """The samples of an :class:`~.folders.ImageFiles` for :func:`write_shards`: each file's own
    bytes (no re-encoding), its extension, its label."""
    for path, label in zip(dataset.files, dataset.targets):
        ext = path.suffix[1:].lower()
        yield path.read_bytes(), "jpg" if ext == "jpeg" else ext, int(label)


def array_samples(images, labels) -> Iterator[tuple[bytes, str, int]]:
    """(N, H, W[, C]) uint8 images and labels as PNG samples (lossless) for
    :func:`write_shards`."""
    from PIL import Image

    for image, label in zip(images, labels):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buf, format="PNG")
        yield buf.getvalue(), "png", int(label)


def shard_split(root: Path, train: bool) -> str:
    """The split of a shard folder a run reads: ``train``, or the first evaluation split it has
    (``validation``, ``val``, ``test``)."""
    if train:
        return "train"
    splits = json.loads((root / SHARD_INFO).read_text()).get("splits", {})
    return next((s for s in ("validation", "val", "test") if s in splits), "validation")


def read_split(root: Path, split: str) -> dict:
    """The ``_info.json`` entry of ``split`` in the shard folder ``root``; ``DataError`` when
    there is none."""
    try:
        info = json.loads((root / SHARD_INFO).read_text())
        splits = info["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{root / SHARD_INFO} is not a shard index ({type(e).__name__}: {e}); "
            "write the shards with tokenmorph data shards"
        ) from None
    if split not in splits:
        raise DataError(
            f"{root} has no split {split!r} (it has {', '.join(sorted(splits))}); "
            "write it with tokenmorph data shards --split"
        )
    return splits[split]


class TarShards(Dataset):
    """The samples of one split of a shard folder (:func:`write_shards`'s layout), random access.

    ``ds[i]`` -> ``(PIL.Image "RGB", label)`` or ``(transform(image), label)`` (a transform with
    ``reads_bytes`` gets the image member's bytes, as :class:`~.folders.ImageFiles`'); for a
    sample that does not decode (or has no image member), ``None`` (``on_error="skip"``: dropped
    and counted by ``collate_skip``) or ``DataError`` (``on_error="raise"``).
    ``labels="folders"`` (what classification asks of a folder) refuses a split with unlabelled
    samples. Attributes: ``root``, ``split``, ``shards`` (paths), ``targets`` (list of int, -1
    without labels), ``classes``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        on_error: str = "skip",
        labels: str = "auto",
        entry: dict | None = None,
    ):
        check_on_error(on_error)
        self.root = Path(root).expanduser()
        if entry is None:  # else the shards are given (``filenames``: paths), as by wds:
            entry = read_split(self.root, split)
        self.split, self.classes = split, list(entry.get("classes", []))
        self.shards = [self.root / f for f in entry["filenames"]]
        self.transform, self.on_error = transform, on_error
        # one row per sample: shard, image member's data offset and size (-1: no image), label
        sizes = entry.get("shard_bytes", [None] * len(self.shards))
        parts = [
            np.concatenate([np.full((len(t), 1), s, dtype=np.int64), t], axis=1)
            for s, (path, size) in enumerate(zip(self.shards, sizes))
            for t in [self._index(path, size)]
        ]
        table = np.concatenate(parts) if parts else np.zeros((0, 5), dtype=np.int64)
        self._shard, self._offset, self._size = table[:, 0], table[:, 1], table[:, 2]
        self._member = table[:, 3]  # the sample's place in its shard
        self.targets = table[:, 4].tolist()
        if labels == "folders" and min(self.targets, default=0) < 0:
            raise DataError(
                f"{self.root}: split {split!r} has unlabelled samples, and labels are needed "
                "here; write the shards from an ImageFolder tree or Fashion-MNIST"
            )
        if len(self.targets) != entry.get("num_samples", len(self.targets)):
            raise DataError(
                f"{self.root}: the shards hold {len(self.targets)} samples of split {split!r}, "
                f"its info says {entry['num_samples']}; write them again"
            )

    @staticmethod
    def _index(path: Path, size: int | None) -> np.ndarray:
        """(data offset, size, place, label) rows of every sample of one shard: its sidecar
        index when the shard is the one it was written for (same size), else from the tar
        headers (shards written by other tools: every member header is read once)."""
        index = _index_path(path)
        try:
            if size is not None and path.stat().st_size == size and index.is_file():
                table = np.load(index, allow_pickle=False)
                if table.ndim == 2 and table.shape[1] == 4:
                    return table.astype(np.int64)
        except (OSError, ValueError):
            pass
        return np.array(TarShards._scan(path), dtype=np.int64).reshape(-1, 4)

    @staticmethod
    def _scan(path: Path) -> list[tuple[int, int, int, int]]:
        """(data offset, size, place, label) of every sample of one shard, from its headers."""
        try:
            tar = tarfile.open(path, "r:")
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"cannot read the shard {path} ({type(e).__name__}: {e})") from None
        samples: dict[str, dict] = {}  # key -> {extension: member}, in shard order
        labels: dict[str, int] = {}
        with tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                samples.setdefault(key, {})[ext] = m
                if ext == "cls":
                    try:
                        labels[key] = int(tar.extractfile(m).read())
                    except ValueError:  # not an integer: the sample counts as unlabelled
                        pass
        rows = []
        for place, (key, members) in enumerate(samples.items()):
            image = next((members[k] for k in IMAGE_KEYS if k in members), None)
            offset, size = (image.offset_data, image.size) if image is not None else (-1, -1)
            rows.append((offset, size, place, labels.get(key, -1)))
        return rows

    def __len__(self) -> int:
        return len(self.targets)

    def position(self, index: int) -> tuple[int, int]:
        """(shard number, place of the sample in that shard) of sample ``index``."""
        return int(self._shard[index]), int(self._member[index])

    def __getitem__(self, index: int):
        shard, offset, size = (int(a[index]) for a in (self._shard, self._offset, self._size))
        what = f"{self.shards[shard].name} sample {int(self._member[index])}"

        def read_bytes():
            if offset < 0:
                raise DataError(f"cannot decode image {what}: the sample has no image member")
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                return f.read(size)

        label = self.targets[index]
        if getattr(self.transform, "reads_bytes", False):  # decoded later (decode=device)
            encoded = lambda: self.transform.from_bytes(read_bytes(), what)
            return load_sample(encoded, label, None, self.on_error)
        return load_sample(
            lambda: decode_rgb(read_bytes(), what), label, self.transform, self.on_error
        )


def load_sample(read: Callable, label: int, transform: Callable | None, on_error: str):
    """``(transform(read()), label)``, where ``read()`` decodes one sample's image; a sample
    whose ``read`` raises ``DataError`` or ``OSError`` is ``None`` (``on_error="skip"``:
    logged, and dropped and counted by ``collate_skip``) or one ``DataError`` (``"raise"``)."""
    try:
        image = read()
    except (DataError, OSError) as e:
        skip_or_raise(e, on_error)
        return None
    return (transform(image) if transform is not None else image), label
