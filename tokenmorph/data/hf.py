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

import logging
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .images import decode_rgb, open_rgb

__all__ = ["HFImages"]

log = logging.getLogger(__name__)

_EVAL_SPLITS = ("validation", "val", "test")


def _load(path: Path):
    """The data set (or dict of splits) stored at ``path``, from local files only."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "data source hfds: needs the datasets package: pip install 'tokenmorph[data]'"
        ) from None
    if not path.exists():
        raise DataError(f"data source hfds:{path} does not exist; pass a save_to_disk folder")
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
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
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: use 'skip' or 'raise'")
        import datasets

        self.root = Path(path).expanduser()
        data = _load(self.root)
        self.split = "train"
        if isinstance(data, datasets.DatasetDict):
            names = ("train",) if train else _EVAL_SPLITS
            self.split = next((s for s in names if s in data), "")
            if not self.split:
                raise DataError(
                    f"data source hfds:{path} has no split {names[0]!r} (it has "
                    f"{', '.join(data)}); save one under that name"
                )
            data = data[self.split]
        features = data.features
        column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        if column is None:
            raise DataError(
                f"data source hfds:{path} has no image column (columns: "
                f"{', '.join(features)}); it needs a datasets.Image feature"
            )
        self.column, self.hf_fingerprint = column, data._fingerprint
        self.data = data.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        label = features.get("label")
        self.targets = [int(v) for v in data["label"]] if label is not None else [-1] * len(data)
        if isinstance(label, datasets.ClassLabel):
            self.classes = list(label.names)
        else:
            self.classes = [str(c) for c in range(max(self.targets, default=-1) + 1)]
        if labels == "folders" and min(self.targets, default=0) < 0:
            raise DataError(
                f"data source hfds:{path}: split {self.split!r} has no label column, and labels "
                "are needed here"
            )
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        what = f"hfds:{self.root} {self.split} row {index}"
        try:
            cell = self.data[int(index)][self.column] or {}
            if cell.get("bytes") is not None:
                image = decode_rgb(cell["bytes"], what)
            elif cell.get("path"):
                image = open_rgb(Path(cell["path"]))
            else:
                raise DataError(f"cannot decode image {what}: the row has no image")
        except (DataError, OSError) as e:
            if self.on_error == "raise":
                raise DataError(str(e)) from None
            log.warning("skipping %s", e)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
