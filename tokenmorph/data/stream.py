"""WebDataset shards read as a stream (``data=wds:DIR_OR_PATTERN``): whole shards in a seeded
order, each read front to back, split over processes by shard, with a position that a killed run
resumes from.

The order (pure functions of the seed, the process count and the shard set; no state):

* epoch ``e`` of process ``r`` of ``R`` reads the shards ``perm_e[r::R]``, ``perm_e`` being
  :func:`shard_order` (a permutation of the shards seeded by (seed, e)); a shard's samples in
  the order of the tar (WebDataset's rule: consecutive members sharing a key are one sample);
* each process's stream is endless: epoch ``e + 1`` follows epoch ``e`` (the processes' epochs
  are their own: with shards of unequal lengths one process may start its next epoch before
  another);
* so the position of a process is one number, the samples it has consumed; :meth:`ShardStream.
  position` says what that is in shards: the epoch, the shards of the epoch already finished,
  the shard in progress and the offset into it.

Reading a sample seeks to its image member (the sidecar index of ``tokenmorph data shards``, or
the shard's tar headers, read once per shard as it is reached, for shards of other tools), so
resuming at an offset opens no finished shard and decodes nothing before the offset. A sample is
identified by its global index (the shards' samples counted in the shard set's order), which
seeds its augmentation with the epoch, as a map-style data set's index does.

Why not timm's ``wds/`` reader or ``webdataset.WebDataset``: both shuffle through a buffer seeded
per worker and have no position to resume from (a resumed run would repeat or skip samples), and
``webdataset``'s tar iterator reads every member's bytes (no seek) to reach an offset.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .images import check_on_error, decode_rgb
from .shards import SHARD_INFO, TarShards, load_sample, read_split, shard_split

__all__ = ["ShardStream", "shard_order", "stream_seed"]


_ORDER_SALT = 0x3D5  # the shard order's own seed stream (the map-style order uses another)


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The permutation of ``num_shards`` shard numbers of epoch ``epoch``: a function of (seed,
    epoch) only, the same on every process."""
    g = torch.Generator().manual_seed(stream_seed(seed, epoch, _ORDER_SALT))
    return torch.randperm(num_shards, generator=g).tolist()


def stream_seed(*values: int) -> int:
    """One 63-bit seed from integers (SHA-256: no structure between nearby values)."""
    h = hashlib.sha256(repr(tuple(int(v) for v in values)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _expand(pattern: str) -> list[str]:
    """A brace pattern (``shard-{000000..000009}.tar``, WebDataset's spelling) and shell globs
    -> the paths, in order, each once."""
    names = [pattern]
    if "{" in pattern:
        try:
            from braceexpand import braceexpand  # installed with webdataset
        except ImportError:
            raise DataError(
                f"wds:{pattern}: a brace pattern needs the braceexpand package (pip install "
                "'tokenmorph[data]'); or pass the shards' folder"
            ) from None
        names = list(braceexpand(pattern))
    out: list[str] = []
    for name in names:
        found = sorted(glob.glob(str(Path(name).expanduser()))) if glob.has_magic(name) else [name]
        out.extend(f for f in found if f not in out)
    return out


class ShardStream:
    """The samples of WebDataset shards as a stream (see the module docstring).

    ``spec``: a folder of shards (with an ``_info.json``, as ``tokenmorph data shards`` writes
    it: the files of its ``train`` split, or with ``train=False`` of ``validation``, ``val`` or
    ``test``; without one: every ``*.tar`` in it, sorted), or a glob or brace pattern of ``.tar``
    files. Each shard's sample count is its info's, or counted from its tar headers (no image is
    decoded). Attributes: ``shards`` (paths), ``lengths``, ``classes`` (the info's, else []),
    ``streaming`` (True: read through :meth:`items`, not by index). ``DataError`` for a spec that
    names no shard or an unreadable one.
    """

    streaming = True

    def __init__(
        self,
        spec: str,
        train: bool = True,
        transform: Callable | None = None,
        on_error: str = "skip",
    ):
        check_on_error(on_error)
        self.spec, self.transform, self.on_error = spec, transform, on_error
        self.classes: list[str] = []
        folder = Path(spec).expanduser()
        info = None
        if folder.is_dir():
            if (folder / SHARD_INFO).is_file():
                info = read_split(folder, shard_split(folder, train))
                self.shards = [folder / f for f in info["filenames"]]
                self.classes = list(info.get("classes", []))
            else:
                self.shards = sorted(folder.glob("*.tar"))
        else:
            self.shards = [Path(p) for p in _expand(spec)]
        missing = [p for p in self.shards if not p.is_file()]
        if not self.shards or missing:
            what = f"{missing[0]} does not exist" if missing else "it names no .tar shard"
            raise DataError(
                f"data source wds:{spec}: {what}; pass a folder of .tar shards or a pattern "
                "such as DIR/name-{000000..000009}.tar"
            )
        if info is not None and len(info.get("shard_lengths", [])) == len(self.shards):
            self.lengths = [int(n) for n in info["shard_lengths"]]
        else:
            self.lengths = [len(TarShards._index(p, None)) for p in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._sizes = info.get("shard_bytes") if info is not None else None
        self._rows: tuple[int, np.ndarray] | None = None  # (shard, its index): the one in use
        self._file = None  # (shard, open file)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # DataLoader workers get their own file handles
        return {**self.__dict__, "_rows": None, "_file": None}

    # ------------------------------------------------------------------ the order
    def rank_shards(self, seed: int, epoch: int, rank: int, world: int) -> list[int]:
        """The shard numbers process ``rank`` of ``world`` reads in epoch ``epoch``, in order."""
        return shard_order(seed, epoch, len(self.shards))[rank::world]

    def check_processes(self, world: int) -> None:
        """``DataError`` when some process would get no shard."""
        if len(self.shards) < world:
            raise DataError(
                f"data source wds:{self.spec} has {len(self.shards)} shards for {world} "
                "processes: a stream is split by shard; write more, smaller shards "
                "(tokenmorph data shards --shard-size) or run fewer processes"
            )

    def _locate(self, seed: int, rank: int, world: int, consumed: int) -> tuple[int, int, int]:
        """(epoch, place in that epoch's shard list, offset in that shard) of process
        ``rank``'s sample number ``consumed``."""
        epoch = 0
        while True:
            shards = self.rank_shards(seed, epoch, rank, world)
            per_epoch = sum(self.lengths[s] for s in shards)
            if consumed < per_epoch:
                break
            epoch, consumed = epoch + 1, consumed - per_epoch
            if per_epoch == 0:
                raise DataError(f"data source wds:{self.spec}: its shards hold no sample")
        for k, s in enumerate(shards):
            if consumed < self.lengths[s]:
                return epoch, k, consumed
            consumed -= self.lengths[s]
        raise AssertionError("unreachable")

    def position(self, seed: int, rank: int, world: int, consumed: int) -> dict:
        """Where process ``rank``'s stream is after ``consumed`` samples: ``{"rank", "epoch",
        "consumed", "finished": the epoch's shards read to the end, "shard": the one in
        progress (the next to start when its offset is 0), "offset": samples of it read}``."""
        epoch, k, offset = self._locate(seed, rank, world, consumed)
        names = [self.shards[s].name for s in self.rank_shards(seed, epoch, rank, world)]
        return {
            "rank": rank,
            "epoch": epoch,
            "consumed": consumed,
            "finished": names[:k],
            "shard": names[k],
            "offset": offset,
        }

    def items(self, seed: int, rank: int, world: int, start: int = 0) -> Iterator[tuple]:
        """Process ``rank``'s stream from its sample number ``start`` on, endless:
        ``(epoch, global index, shard, place in the shard)`` per sample (nothing is read but the
        index of each shard reached)."""
        epoch, k, offset = self._locate(seed, rank, world, start)
        while True:
            for s in self.rank_shards(seed, epoch, rank, world)[k:]:
                first = int(self.starts[s])
                for place in range(offset, self.lengths[s]):
                    yield epoch, first + place, s, place
                offset = 0
            epoch, k = epoch + 1, 0

    # ------------------------------------------------------------------ reading
    def _index(self, shard: int) -> np.ndarray:
        if self._rows is None or self._rows[0] != shard:
            size = self._sizes[shard] if self._sizes else None
            rows = TarShards._index(self.shards[shard], size)
            if len(rows) != self.lengths[shard]:
                raise DataError(
                    f"{self.shards[shard]} holds {len(rows)} samples, {self.lengths[shard]} "
                    "were counted when the run started: the shard changed; restore it"
                )
            self._rows = (shard, rows)
        return self._rows[1]

    def label(self, shard: int, place: int) -> int:
        """The class of a sample (-1: none)."""
        return int(self._index(shard)[place, 3])

    def load(self, shard: int, place: int):
        """``(PIL.Image "RGB" or transform(image), label)`` of one sample; ``None`` for one that
        does not decode (``on_error="skip"``, logged) or ``DataError`` (``"raise"``)."""
        offset, size, _, label = (int(v) for v in self._index(shard)[place])
        what = f"{self.shards[shard].name} sample {place}"

        def read():
            if offset < 0:
                raise DataError(f"cannot decode image {what}: the sample has no image member")
            if self._file is None or self._file[0] != shard:  # one open shard per worker
                if self._file is not None:
                    self._file[1].close()
                self._file = (shard, open(self.shards[shard], "rb"))
            self._file[1].seek(offset)
            return decode_rgb(self._file[1].read(size), what)

        return load_sample(read, label, self.transform, self.on_error)

    def indexed(self, labels: str = "auto") -> TarShards:
        """The same shards as a random-access data set (evaluation reads every sample once, in
        any order), with this stream's transform and ``on_error``."""
        entry = {
            "filenames": [str(p) for p in self.shards],
            "classes": self.classes,
            "shard_bytes": self._sizes or [None] * len(self.shards),
        }
        split = "stream"
        return TarShards(self.shards[0].parent, split, self.transform, self.on_error, labels, entry)

    def fingerprint(self) -> dict:
        """The shard set: every shard's name, size and sample count (a changed one is a
        changed stream: its positions mean other samples)."""
        h = hashlib.sha256()
        for path, n in zip(self.shards, self.lengths):
            try:
                size = path.stat().st_size
            except OSError as e:
                size = f"unreadable:{e.errno}"
            h.update(f"{path.name}:{size}:{n}\n".encode())
        return {
            "kind": "wds stream",
            "count": len(self),
            "shards": len(self.shards),
            "names": h.hexdigest()[:16],
        }
