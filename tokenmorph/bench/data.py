"""``tokenmorph bench data``: images/s of the pre-training loader from a folder of JPEG files,
from WebDataset tar shards of the same files, and from decoded images in memory, at several crop
sizes and worker counts.

The images are photo crops of scikit-image's sample photos at ImageNet's typical size (500 x 375,
JPEG quality 90), written to a temporary folder; the shards are those files, packed by
:func:`~tokenmorph.data.shards.write_shards`. Each measurement is one pass of a ``DataLoader``
over the pre-training augmentation (colour jitter, flip, RandomResizedCrop to the crop side,
ToTensor) through the run's own keyed loading (per-sample seeding, skip-and-count collate),
timed from the first batch to the last (worker start-up left out: it is paid once per run).
With a decode device, the ``decode=device`` path too: the workers read the files and draw the
same parameters, and the batches are decoded (``decode_jpeg``) and augmented on that device.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import ImageFiles, pretrain_transform
from ..data.device_decode import DeviceAugment
from ..data.images import SAMPLE_PHOTOS, open_rgb
from ..data.shards import TarShards, folder_samples, write_shards
from ..runtime.sampling import KeyedDataset, batch_to_device, collate_keyed

__all__ = ["bench_data", "SOURCE_SIZE"]

SOURCE_SIZE = (500, 375)  # ImageNet's most common image size


class _InMemory(Dataset):
    """Decoded images held in memory: the loader's cost without reading or decoding."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), -1


def _write_jpegs(folder: Path, count: int, seed: int) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, n)() for n in SAMPLE_PHOTOS[:4]]
    w, h = SOURCE_SIZE
    for i in range(count):
        img = photos[i % len(photos)]
        s = int(rng.integers(min(img.shape[:2]) // 2, min(img.shape[:2])))
        y, x = (
            int(rng.integers(0, img.shape[0] - s + 1)),
            int(rng.integers(0, img.shape[1] - s + 1)),
        )
        crop = Image.fromarray(img[y : y + s, x : x + s]).convert("RGB").resize((w, h))
        crop.save(folder / f"{i:06d}.jpg", quality=90)


def _rate(dataset, batch_size: int, workers: int, seed: int, device=None) -> float:
    """images/s of one pass; with ``device``, each batch is also decoded and augmented there
    (``decode=device``: the loader gives the files' bytes and the drawn parameters)."""
    keyed = KeyedDataset(dataset, seed)
    keys = [
        [(i, 0) for i in range(b, min(b + batch_size, len(dataset)))]
        for b in range(0, len(dataset), batch_size)
    ]
    loader = DataLoader(
        keyed,
        batch_sampler=keys,
        num_workers=workers,
        collate_fn=collate_keyed,
        prefetch_factor=4 if workers else None,
    )

    device = None if device is None else torch.device(device)

    def load(batch):
        return batch if device is None else batch_to_device(batch, device)

    it = iter(loader)
    first = load(next(it))
    _synchronize(device)
    start, count = time.perf_counter(), 0
    for batch in it:
        count += load(batch)["images"].shape[0]
    _synchronize(device)
    elapsed = time.perf_counter() - start
    assert first["skipped"] == 0
    return count / elapsed if elapsed > 0 else float("nan")


def _synchronize(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(
    images: int = 256,
    crops: tuple[int, ...] = (32, 224),
    workers: tuple[int, ...] = (0, 2, 4),
    batch_size: int = 32,
    shard_size: int = 64,
    seed: int = 0,
    decode_device: str | None = None,
) -> dict:
    """The measurements as a JSON-ready dict: ``results`` rows of (source, decode, crop,
    workers, images_per_s), and the machine they were measured on. ``decode_device`` (e.g.
    ``cuda``) adds the ``decode=device`` rows of the JPEG folder and the shards: the workers
    read the bytes and draw the parameters, the batches are decoded and augmented on that
    device (timed to its last kernel)."""
    if images < 2 * batch_size:
        raise ValueError(f"images={images}: give at least two batches ({2 * batch_size})")
    with tempfile.TemporaryDirectory(prefix="tokenmorph-bench-data-") as tmp:
        folder, shards = Path(tmp) / "jpeg", Path(tmp) / "shards"
        folder.mkdir()
        _write_jpegs(folder, images, seed)
        files = ImageFiles(folder)
        write_shards(folder_samples(files), shards, "bench", "train", shard_size)
        decoded = [open_rgb(p) for p in files.files]
        rows = []
        for crop in crops:
            transform = pretrain_transform(crop)
            sources = {
                "jpeg_folder": ImageFiles(folder, transform=transform),
                "tar_shards": TarShards(shards, "train", transform=transform),
                "memory": _InMemory(decoded, transform),
            }
            runs = [(name, ds, "cpu", None) for name, ds in sources.items()]
            if decode_device is not None:
                augment, where = DeviceAugment(crop), f"device:{decode_device}"
                runs += [
                    ("jpeg_folder", ImageFiles(folder, transform=augment), where, decode_device),
                    (
                        "tar_shards",
                        TarShards(shards, "train", transform=augment),
                        where,
                        decode_device,
                    ),
                ]
            for name, ds, decode, device in runs:
                for w in workers:
                    rate = _rate(ds, batch_size, w, seed, device)
                    rows.append(
                        {
                            "source": name,
                            "decode": decode,
                            "crop": crop,
                            "workers": w,
                            "images_per_s": round(rate, 1),
                        }
                    )
    return {
        "images": images,
        "image_size": list(SOURCE_SIZE),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "augmentation": "colour jitter 0.4, flip, RandomResizedCrop(crop, (0.08, 1)), ToTensor",
        "decode_device": decode_device,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "results": rows,
    }
