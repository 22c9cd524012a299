"""Hugging Face data sets from local files (``data=hfds:PATH``): a folder written by
``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a local folder or file that
``datasets.load_dataset`` reads (parquet, an imagefolder), as a random-access data set.

The image column is read undecoded (``datasets.Image(decode=False)``: the file's bytes) and
decoded by our decoder, so an undecodable image is skipped and counted like a bad file (or
``on_error="raise"`` names it); labels come from the ``label`` column (a ``ClassLabel``'s names
are the classes), so k-NN and linear evaluation read it too. Random access means a run from it
has everything a folder's run has: the data order of (seed, epoch), per-sample seeding, exact
resume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .images import check_on_error, decode_rgb, open_rgb
from .shards import load_sample

__all__ = ["HFImages", "HFStream"]


_EVAL_SPLITS = ("validation", "val", "test")


def _datasets():
    """The ``datasets`` module, or ``DataError`` naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data sources hfds: and hfids: need the datasets package: pip install "
            "'tokenmorph[data]'"
        ) from None
    return datasets


def _load(path: Path):
    """The data set (or dict of splits) stored at ``path``, from local files only."""
    datasets = _datasets()
    if not path.exists():
        raise DataError(f"data source hfds:{path} does not exist; pass a save_to_disk folder")
    try:
        if _saved(path):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many kinds, none a user can act on by type
        raise DataError(
            f"data source hfds:{path} cannot be read by datasets ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); pass a save_to_disk folder or parquet files"
        ) from None


class HFImages(Dataset):
    """One split of a local Hugging Face data set, random access.

    ``ds[i]`` -> ``(PIL.Image "RGB" or transform(image), label)`` (label -1 without a ``label``
    column), ``None`` for an undecodable image (``on_error="skip"``) or ``DataError``
    (``"raise"``). ``train`` picks the ``train`` split of a dict of splits, else the first of
    ``validation``, ``val``, ``test``; a single data set is its own split. Attributes: ``split``,
    ``column`` (the image column), ``targets``, ``classes``, ``hf_fingerprint`` (datasets' own
    hash of the stored data).
    """

    def __init__(
        self,
        path: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        on_error: str = "skip",
        labels: str = "auto",
    ):
        check_on_error(on_error)
        datasets = _datasets()

        self.root = Path(path).expanduser()
        data = _load(self.root)
        self.split, data = _split(data, train, f"hfds:{path}")
        features = data.features
        column = _image_column(features, f"hfds:{path}")
        self.column, self.hf_fingerprint = column, data._fingerprint
        self.data = data.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        label = features.get("label")
        self.targets = [int(v) for v in data["label"]] if label is not None else [-1] * len(data)
        self.classes = _classes(label, self.targets)
        if labels == "folders" and min(self.targets, default=0) < 0:
            raise DataError(
                f"data source hfds:{path}: split {self.split!r} has no label column, and labels "
                "are needed here"
            )
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        cell = self.data[int(index)][self.column]
        what = f"hfds:{self.root} {self.split} row {index}"
        return _decode(cell, self.targets[index], what, self.transform, self.on_error)


def _split(data, train: bool, source: str):
    """(split name, the data set of that split) of a data set or a dict of splits."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return "train", data
    names = ("train",) if train else _EVAL_SPLITS
    split = next((s for s in names if s in data), "")
    if not split:
        raise DataError(
            f"data source {source} has no split {names[0]!r} (it has {', '.join(data)}); save "
            "one under that name"
        )
    return split, data[split]


def _image_column(features, source: str) -> str:
    """The first ``datasets.Image`` column."""
    import datasets

    column = next((k for k, f in (features or {}).items() if isinstance(f, datasets.Image)), None)
    if column is None:
        raise DataError(
            f"data source {source} has no image column (columns: {', '.join(features or {})}); "
            "it needs a datasets.Image feature"
        )
    return column


def _classes(label, targets) -> list[str]:
    """A ClassLabel's names, else the class numbers."""
    import datasets

    if isinstance(label, datasets.ClassLabel):
        return list(label.names)
    return [str(c) for c in range(max(targets, default=-1) + 1)]


def _decode(cell, label: int, what: str, transform, on_error: str):
    """``(image or transform(image), label)`` of an undecoded ``datasets.Image`` cell (its
    ``bytes``, else its ``path``); None (skipped, logged) or ``DataError`` when it does not
    decode."""
    cell = cell or {}

    def read():
        if cell.get("bytes") is not None:
            return decode_rgb(cell["bytes"], what)
        if cell.get("path"):
            return open_rgb(Path(cell["path"]))
        raise DataError(f"cannot decode image {what}: the row has no image")

    return load_sample(read, label, transform, on_error)


class HFStream:
    """A local Hugging Face data set read as a stream (``data=hfids:PATH``): a
    ``datasets.IterableDataset`` (``load_dataset(PATH, streaming=True)``, or a save_to_disk
    folder's split through ``to_iterable_dataset``), no random access.

    The order (the protocol of :class:`~.stream.ShardStream`, so the run's loader and
    checkpoints treat it the same): epoch ``e`` is the data set shuffled by ``datasets`` with
    seed (seed, e) (its shard order and a buffer of ``buffer`` rows), split over the processes
    by ``datasets.distributed.split_dataset_by_node``; each process's stream is endless and its
    position is the number of samples it consumed. A sample is identified by its place in its
    process's stream (``k x processes + rank``: the rows have no index here). Resuming reads
    (without decoding) the consumed rows again to reach the position: datasets' own
    ``state_dict`` does not keep its shuffle buffer. Its length: a saved data set's row count,
    else the rows counted by one pass at start (the label column only, when there is one).
    """

    streaming = True

    def __init__(
        self,
        path: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        on_error: str = "skip",
        buffer: int = 1000,
    ):
        check_on_error(on_error)
        datasets = _datasets()

        self.root = Path(path).expanduser()
        source = f"hfids:{path}"
        if not self.root.exists():
            raise DataError(f"data source {source} does not exist; pass a local data set")
        try:
            if _saved(self.root):
                self.split, data = _split(datasets.load_from_disk(str(self.root)), train, source)
                fingerprint, count = data._fingerprint, len(data)
                data = data.to_iterable_dataset()
            else:
                loaded = datasets.load_dataset(str(self.root), streaming=True)
                self.split, data = _split(loaded, train, source)
                fingerprint, count = None, None
        except DataError:
            raise
        except Exception as e:  # datasets raises many kinds, none a user can act on by type
            raise DataError(
                f"data source {source} cannot be read by datasets ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]})"
            ) from None
        features = data.features
        self.column = _image_column(features, source)
        label = (features or {}).get("label")
        self.data = data.cast_column(self.column, datasets.Image(decode=False))
        self.data = self.data.select_columns([self.column] + (["label"] if label else []))
        if count is None:  # counted once (the label column only when there is one)
            counted = data.select_columns(["label"] if label else [self.column])
            count = sum(len(b[next(iter(b))]) for b in counted.iter(batch_size=1000))
        self.count, self.hf_fingerprint = count, fingerprint
        self.classes = _classes(label, []) if label else []
        self.transform, self.on_error, self.buffer = transform, on_error, buffer

    def __len__(self) -> int:
        return self.count

    def check_processes(self, world: int) -> None:
        """``DataError`` when some process would get no row."""
        if self.count < world:
            raise DataError(f"hfids:{self.root} has {self.count} rows for {world} processes")

    def _epoch(self, seed: int, epoch: int, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node

        from .stream import stream_seed

        shuffled = self.data.shuffle(seed=stream_seed(seed, epoch) % 2**32, buffer_size=self.buffer)
        return split_dataset_by_node(shuffled, rank=rank, world_size=world)

    def items(self, seed: int, rank: int, world: int, start: int = 0):
        """Process ``rank``'s stream from its sample number ``start`` on, endless: ``(epoch,
        identity, cell, label)`` per sample (``.iter``: datasets splits nothing over loader
        workers, so every worker sees the process's whole stream)."""
        k, epoch = 0, 0
        while True:
            rows = 0
            for batch in self._epoch(seed, epoch, rank, world).iter(batch_size=1):
                rows += 1
                if k >= start:
                    label = int(batch["label"][0]) if "label" in batch else -1
                    yield epoch, k * world + rank, batch[self.column][0], label
                k += 1
            if rows == 0:
                raise DataError(f"hfids:{self.root}: process {rank} got no row")
            epoch += 1

    def load(self, cell, label: int):
        """``(image or transform(image), label)`` of one row's cell; None or ``DataError``
        for one that does not decode."""
        return _decode(cell, label, f"hfids:{self.root} row", self.transform, self.on_error)

    def position(self, seed: int, rank: int, world: int, consumed: int) -> dict:
        """Where process ``rank`` is: the samples it consumed (its epoch is not stored: finding
        it means reading the stream)."""
        return {"rank": rank, "consumed": consumed}

    def fingerprint(self) -> dict:
        """The row count, split and datasets' fingerprint of the stored data (None for files
        read by ``load_dataset``: then the count and the files' names and sizes)."""
        sample = self.hf_fingerprint
        if sample is None:
            import hashlib

            h = hashlib.sha256()
            for p in sorted(q for q in self.root.rglob("*") if q.is_file()):
                h.update(f"{p.relative_to(self.root)}:{p.stat().st_size}\n".encode())
            sample = h.hexdigest()[:16]
        return {"kind": f"hfids {self.split}", "count": self.count, "sample": sample}


def _saved(path: Path) -> bool:
    """Whether ``path`` is a save_to_disk folder (a data set or a dict of splits)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
