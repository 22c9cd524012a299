"""The data order of a run: which samples each rank loads at each step, and how each is seeded.

Exact resume rests on two rules here (and a third in the engine: the training RNG is re-seeded
from (seed, step, rank) at every step):

* the data order is a pure function of (seed, epoch): a global permutation per epoch, cut into
  global batches, each cut into accumulation micro-batches and then rank shards; the position is
  the step;
* every sample's augmentation (and mask) is seeded by (seed, epoch, index), whichever worker
  loads it.

Every key also carries the sample's position in its global batch, so that what is drawn per chunk
of the global batch (``chunk_size`` images: DTM's schedules, the zoom-out offset, the grey
weights) depends on that position, never on the rank or the micro-batch. So changing the number
of processes keeps the same global batches, hence the same training where no per-rank randomness
enters.

A streamed source (``data=wds:``, :class:`KeyedStream`) has no index to permute: each rank reads
its own endless stream (:class:`~tokenmorph.data.stream.ShardStream`), and its position is the
number of samples it has consumed, saved in the checkpoint (:meth:`KeyedStream.state_dict`).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from ..data import collate_skip, describe_fingerprint, to_unit_float
from ..data.device_decode import EncodedImage, decode_batch
from ..errors import CheckpointError, ConfigError, DataError, TokenmorphError
from .seeding import mix_seed, seed_all

__all__ = [
    "check_batch_layout",
    "steps_per_epoch",
    "KeyedDataset",
    "KeyedStream",
    "keyed_data",
    "LoadFailure",
    "collate_keyed",
    "batch_to_device",
    "StepBatchSampler",
]


def check_batch_layout(batch_size: int, accum_steps: int, world_size: int) -> None:
    """The global batch must split evenly into accumulation micro-batches and rank shards."""
    if batch_size % (accum_steps * world_size):
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by accum_steps x processes = "
            f"{accum_steps} x {world_size}; choose a multiple of {accum_steps * world_size}"
        )


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Whole global batches in an epoch; ``DataError`` for a data set smaller than one."""
    if num_samples < global_batch:
        raise DataError(
            f"the data set has {num_samples} images, fewer than one global batch of "
            f"{global_batch}; lower batch_size or add data"
        )
    return num_samples // global_batch


class LoadFailure(str):
    """A sample whose loading raised a user-facing error (``on_bad_image=raise``): its one-line
    message, carried through the loader as data so that the main process raises it as one line
    (a worker's exception would come back as a multi-line traceback text)."""


class KeyedDataset(Dataset):
    """Wraps a dataset so that item ``(index, epoch[, position])`` is reproducible wherever it is
    loaded.

    Before loading, torch's, Python's and NumPy's RNGs are seeded from (seed, epoch, index); an
    optional ``extra_fn(rng)`` (e.g. a mask generator) draws from a NumPy generator with the same
    seed. Returns ``(image, label, extra, position)`` (``position``: the sample's place in its
    global batch, None when the key has none), None for a skipped (undecodable) sample, or a
    :class:`LoadFailure` when loading raised a ``TokenmorphError``.
    """

    def __init__(self, dataset: Dataset, seed: int, extra_fn: Callable | None = None) -> None:
        self.dataset, self.seed, self.extra_fn = dataset, seed, extra_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key[0], key[1]
        position = key[2] if len(key) > 2 else None
        return _keyed_item(
            lambda: self.dataset[index], self.seed, epoch, index, position, self.extra_fn
        )


def _keyed_item(load: Callable, seed: int, epoch: int, index: int, position, extra_fn):
    """``load()`` with every RNG seeded from (seed, epoch, index), as :class:`KeyedDataset`'s
    items: ``(image, label, extra, position)``, None (skipped) or a :class:`LoadFailure`."""
    s = mix_seed(seed, epoch, index)
    seed_all(s, accelerators=False)  # samples are augmented on the CPU
    try:
        item = load()
    except TokenmorphError as e:
        return LoadFailure(str(e))
    if item is None:
        return None
    image, label = item
    extra = extra_fn(np.random.default_rng(s)) if extra_fn is not None else None
    return image, label, extra, position


class KeyedStream(IterableDataset):
    """A streamed source (``wds:`` :class:`~tokenmorph.data.stream.ShardStream`, ``hfids:``
    :class:`~tokenmorph.data.hf.HFStream`) as the training loader reads it: each rank's stream
    cut into micro-batches, every sample seeded by (seed, its stream epoch, its global index) as
    :class:`KeyedDataset` seeds it.

    :meth:`span` sets what one loader yields: this rank's micro-batches (lists of
    :class:`KeyedDataset`-style items; the loader's ``batch_size=None``, ``collate_keyed``
    stacks each) from its sample number ``start`` on. Step s of a rank takes the next
    ``batch_size / world_size`` samples of its stream, ``accum_steps`` micro-batches of
    consecutive samples; a sample's position in its global batch is ``rank x per-rank share +
    its place in the rank's share``. DataLoader workers split the micro-batches, not the
    shards: worker w of W yields micro-batches w, w + W, ... (the loader takes them round-robin,
    so in order) and skips the others' samples without reading them, so the batches are the
    same for any number of workers.
    """

    def __init__(self, stream, seed: int, extra_fn: Callable | None = None) -> None:
        self.stream, self.seed, self.extra_fn = stream, seed, extra_fn
        self._span = (0, 1, 1, 1, 0, 0)

    def __len__(self) -> int:
        return len(self.stream)

    def span(
        self, rank: int, world: int, micro: int, accum: int, start: int, batches: int
    ) -> KeyedStream:
        """This stream, set to yield ``batches`` micro-batches of ``micro`` samples (``accum``
        of them a step) of rank ``rank`` of ``world``'s stream from its sample number
        ``start`` (a step's first) on."""
        self._span = (rank, world, micro, accum, start, batches)
        return self

    def state_dict(self, consumed: int, world: int) -> dict:
        """The position to save after each rank consumed ``consumed`` samples: the rule's
        inputs (seed, processes, consumed, the shard set) and, for reading, every rank's
        position in shards (:meth:`~tokenmorph.data.stream.ShardStream.position`)."""
        return {
            "kind": "stream",
            "seed": self.seed,
            "processes": world,
            "consumed": consumed,
            "data": self.stream.fingerprint(),
            "ranks": [self.stream.position(self.seed, r, world, consumed) for r in range(world)],
        }

    def load_state_dict(self, state: dict | None, world: int, where) -> int:
        """The samples each rank consumed, from a checkpoint's :meth:`state_dict`;
        ``CheckpointError`` (one line) when the stream cannot go on from it exactly: no
        position saved, another shard set, seed or process count."""
        if not state or state.get("kind") != "stream":
            raise CheckpointError(
                f"{where} has no stream position (written from another kind of source); "
                "resume it with its own data source, or use another --output-dir"
            )
        theirs, ours = state.get("data", {}), self.stream.fingerprint()
        why = None
        if theirs != ours:
            why = (
                f"its data changed ({describe_fingerprint(theirs)} -> "
                f"{describe_fingerprint(ours)}): restore it"
            )
        elif state.get("seed") != self.seed:
            why = f"seed {state.get('seed')} -> {self.seed}: resume with seed={state.get('seed')}"
        elif state.get("processes") != world:
            why = (
                f"it was read by {state.get('processes')} processes, this run has {world} (a "
                f"stream is split by process): resume with {state.get('processes')} processes"
            )
        if why:
            raise CheckpointError(
                f"{where}: the stream position cannot be carried over: {why}, or use another "
                "--output-dir"
            )
        return int(state["consumed"])

    def __iter__(self):
        rank, world, micro, accum, start, batches = self._span
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items = self.stream.items(self.seed, rank, world, start)
        share = micro * accum
        for m in range(batches):
            chunk = list(islice(items, micro))
            if m % workers != worker:
                continue
            first = rank * share + (m % accum) * micro
            yield [
                _keyed_item(
                    lambda s=s, p=p: self.stream.load(s, p),
                    self.seed,
                    epoch,
                    index,
                    first + j,
                    self.extra_fn,
                )
                for j, (epoch, index, s, p) in enumerate(chunk)
            ]


def keyed_data(dataset, seed: int, extra_fn: Callable | None = None):
    """A :class:`KeyedStream` for a streamed source, else a :class:`KeyedDataset`."""
    if getattr(dataset, "streaming", False):
        return KeyedStream(dataset, seed, extra_fn)
    return KeyedDataset(dataset, seed, extra_fn)


def collate_keyed(batch: list) -> dict:
    """Stack the kept items of a :class:`KeyedDataset` batch (``(image, label, extra[,
    position])``); count the skipped ones. Returns ``{"images": (B, 3, S, S), "labels": (B,),
    "extra": None | (B, ...) | {name: (B, ...)}, "positions": None | B ints (each kept sample's
    place in its global batch; a list, so it stays on the host), "skipped": int}``, or
    ``{"error": message}`` when an item is a :class:`LoadFailure`."""
    failures = [b for b in batch if isinstance(b, LoadFailure)]
    if failures:
        return {"error": str(failures[0])}
    kept = [b for b in batch if b is not None]
    if kept and isinstance(kept[0][0], EncodedImage):  # decode=device: decoded on the device
        images, skipped = [b[0] for b in kept], len(batch) - len(kept)
        labels = torch.tensor([int(b[1]) for b in kept], dtype=torch.long)
    else:
        images, labels, skipped = collate_skip([None if b is None else (b[0], b[1]) for b in batch])
    extra = None
    if kept and isinstance(
        kept[0][2], dict
    ):  # several per-sample tensors (a mask, degradation parameters)
        extra = {k: torch.stack([torch.as_tensor(b[2][k]) for b in kept]) for k in kept[0][2]}
    elif kept and kept[0][2] is not None:
        extra = torch.stack([torch.as_tensor(b[2]) for b in kept])
    positions = None
    if kept and len(kept[0]) > 3 and kept[0][3] is not None:
        positions = [int(b[3]) for b in kept]
    return {
        "images": images,
        "labels": labels,
        "extra": extra,
        "positions": positions,
        "skipped": skipped,
    }


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A :func:`collate_keyed` batch on ``device`` (nested dicts of extras included); uint8
    images (the loader sends a quarter of float32's bytes) become float in [0, 1] there.
    ``decode=device`` batches (a list of :class:`~tokenmorph.data.device_decode.EncodedImage`)
    are decoded and augmented there; the images that do not decode are dropped with their
    labels, extras and positions, and counted in ``skipped``."""
    nb = device.type == "cuda"
    if isinstance(batch.get("images"), list):
        images, kept = decode_batch(batch["images"], device)
        batch = {**batch, "images": images}
        if not all(kept):
            batch = _keep(batch, kept)

    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device, non_blocking=nb) if torch.is_tensor(v) else v

    out = move(batch)
    if torch.is_tensor(out.get("images")):
        out["images"] = to_unit_float(out["images"])
    return out


def _keep(batch: dict, kept: list[bool]) -> dict:
    """``batch`` without the samples ``kept`` marks False (but ``images``, already without
    them), those counted in ``skipped``."""
    index = torch.tensor([k for k, keep in enumerate(kept) if keep], dtype=torch.long)

    def take(v):
        if isinstance(v, dict):
            return {k: take(x) for k, x in v.items()}
        return v[index] if torch.is_tensor(v) else v

    out = {k: take(v) for k, v in batch.items() if k not in ("images", "positions", "skipped")}
    positions = batch.get("positions")
    return {
        **out,
        "images": batch["images"],
        "positions": None if positions is None else [p for p, k in zip(positions, kept) if k],
        "skipped": batch["skipped"] + kept.count(False),
    }


class StepBatchSampler(Sampler):
    """Yields this rank's micro-batches of ``(index, epoch, position)`` keys, from
    ``start_step`` to ``total_steps`` (``position``: the sample's place in its global batch).

    Epoch e uses permutation ``randperm(n, seed=mix(seed, e))`` cut into ``n // global_batch``
    global batches (the remainder is dropped); step s is batch ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch``. Each global batch is cut into ``accum_steps`` micro-batches, each
    micro-batch into ``world_size`` equal shards. ``ConfigError`` for a batch that does not split
    so, ``DataError`` for a data set smaller than one global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int = 0,
    ) -> None:
        check_batch_layout(global_batch, accum_steps, world_size)
        self.steps_per_epoch = steps_per_epoch(num_samples, global_batch)
        self.n, self.global_batch, self.accum = num_samples, global_batch, accum_steps
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.micro = global_batch // accum_steps
        self.shard = self.micro // world_size
        self._perm_epoch, self._perm = None, None

    def span(self, start_step: int, total_steps: int) -> StepBatchSampler:
        """This sampler, set to yield steps ``start_step .. total_steps - 1``."""
        self.start_step, self.total_steps = start_step, total_steps
        return self

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.accum

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def keys_for_step(self, step: int) -> list[list[tuple[int, int, int]]]:
        """This rank's micro-batches of step ``step``: ``accum_steps`` lists of ``(index, epoch,
        position in the global batch)``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[
            b * self.global_batch : (b + 1) * self.global_batch
        ].tolist()
        out = []
        for a in range(self.accum):
            first = a * self.micro + self.rank * self.shard
            out.append(
                [(i, epoch, first + j) for j, i in enumerate(batch[first : first + self.shard])]
            )
        return out

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.keys_for_step(step)
