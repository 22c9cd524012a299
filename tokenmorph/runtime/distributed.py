"""Processes: joining torchrun's process group, the device of each rank, collective sums."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "shutdown_distributed",
    "all_reduce",
    "all_reduce_sums",
    "broadcast_object",
    "barrier",
    "is_peer_failure",
    "env_rank",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size``, ``local_rank`` on its node, its
    ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 without one); readable before any process
    group."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when visible), ``cuda`` (this rank's GPU) or ``cpu``."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group (a gloo process that exits without it can abort at interpreter
    exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(info: DistInfo, value: float, op: str = "sum") -> float:
    """``value`` summed (``op="sum"``) or maximised (``"max"``) over the ranks; itself in one
    process."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sums(info: DistInfo, values: list[float]) -> list[float]:
    """Several numbers summed over the ranks in ONE collective (float64); themselves in one
    process."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself in one process."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=info.device)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing in one process)."""
    if info.distributed:
        dist.barrier()


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the group is gone
    (killed, crashed): torch's distributed errors, or gloo's / NCCL's runtime errors."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset")
    )
