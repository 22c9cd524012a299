"""Folders of image files: every image under a folder (recursively), or an ImageFolder tree whose
first-level sub-folders are the classes. Undecodable files are skipped (``None`` items, dropped
and counted by :func:`tokenmorph.data.collate_skip`) or raise ``DataError``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

from torch.utils.data import Dataset

from ..errors import DataError
from .images import check_on_error, open_rgb, read_file, skip_or_raise

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


def _image_files(root: Path, exclude: Sequence[PathLike] = ()) -> tuple[list[Path], list[Path]]:
    """(image files, other entries named like images) under ``root``, recursively, following
    symbolic links but entering every real folder once (no loops, no duplicates) and never the
    folders in ``exclude`` (e.g. a run folder inside the data); hidden files and folders
    (".name", e.g. macOS "._x.jpg") are skipped. Only regular files are image files: a FIFO,
    socket or device named ``x.png`` (which ``open`` would block on or misread) is returned in
    the second list instead. Order: ImageFolder's (by first-level folder, then folder path, then
    file name)."""
    excluded = {os.path.realpath(p) for p in exclude}
    found, irregular, seen, stack = [], [], set(), [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen or real in excluded:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: skipped, as os.walk does
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows symbolic links
                stack.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                # DirEntry.is_file: a regular file (or a link to one), from the cached type
                (found if entry.is_file() else irregular).append(Path(entry.path))

    def order(path: Path):
        rel = path.relative_to(root)
        return (rel.parts[0] if len(rel.parts) > 1 else "", rel.parent.as_posix(), rel.name)

    return sorted(found, key=order), sorted(irregular)


class ImageFiles(Dataset):
    """Every image under a folder, searched recursively (flat folders need no class sub-folders),
       or
    an ImageFolder tree (``root/CLASS/**/image``).

    ``labels``: ``"none"`` (every label -1), ``"folders"`` (class = first-level sub-folder,
    classes sorted by name; sub-folders without images are not classes), ``"auto"``
    (``"folders"`` when ``root`` holds sub-folders and no image directly, else ``"none"``).

    ``ds[i]`` -> ``(PIL.Image "RGB", label)`` or ``(transform(image), label)`` (a transform with
    ``reads_bytes``, :class:`~.device_decode.DeviceAugment`, gets the file's bytes:
    ``(transform.from_bytes(data, name), label)``); for a file that does not decode, ``None``
    (``on_error="skip"``, logged as a warning; ``collate_skip`` drops and counts it) or
    ``DataError`` (``on_error="raise"``). Attributes: ``files`` (sorted list of Paths),
    ``targets`` (list of int), ``classes`` (list of str, empty without labels), ``irregular``
    (entries named like images that are not regular files: FIFOs, sockets, devices, broken links;
    never opened). ``exclude``: folders left out of the scan.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Callable | None = None,
        on_error: str = "skip",
        labels: str = "auto",
        exclude: Sequence[PathLike] = (),
    ):
        check_on_error(on_error)
        if labels not in ("auto", "none", "folders"):
            raise ValueError(f"labels={labels!r}: use 'auto', 'none' or 'folders'")
        root = Path(root).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise DataError(
                f"image folder {root} {what}; pass a folder of images or 'fashion-mnist'"
            )
        files, irregular = _image_files(root, exclude)
        if irregular:
            log.warning(
                "skipping %d entries named like images that are not regular files (e.g. %s)",
                len(irregular),
                irregular[0],
            )
        if not files:
            raise DataError(
                f"no images found under {root} (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        top_level = [f for f in files if f.parent == root]
        if labels == "auto":
            labels = "none" if top_level else "folders"
        if labels == "folders":
            if top_level:
                raise DataError(
                    f"labels='folders' needs every image inside a class sub-folder, but {root} "
                    "holds "
                    f"{len(top_level)} directly (e.g. {top_level[0].name}); move them or use "
                    "labels='none'"
                )
            self.classes = sorted({f.relative_to(root).parts[0] for f in files})
            index = {c: i for i, c in enumerate(self.classes)}
            self.targets = [index[f.relative_to(root).parts[0]] for f in files]
        else:
            self.classes, self.targets = [], [-1] * len(files)
        self.root, self.files, self.irregular = root, files, irregular
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            if getattr(self.transform, "reads_bytes", False):  # decoded later (decode=device)
                return self.transform.from_bytes(read_file(path), str(path)), self.targets[index]
            image = open_rgb(path)
        except DataError as e:
            skip_or_raise(e, self.on_error)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
