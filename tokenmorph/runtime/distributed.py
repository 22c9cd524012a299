"""Processes: joining the process group of torchrun or of SLURM's ``srun``, the device of each
rank, collective sums.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``,
which torch's ``env://`` rendezvous reads. ``srun`` (one task per GPU, no torchrun) sets only
SLURM's own variables; :func:`launch_env` maps them (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``, a port
from ``SLURM_JOB_ID``) onto torch's names. Variables already set win, so torchrun started by
srun, or a ``MASTER_ADDR``/``MASTER_PORT`` exported in the batch script, are taken as they are.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
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
    "launch_env",
    "first_host",
]

DEFAULT_PORT = 29500  # torchrun's


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, as ``scontrol show hostnames | head -n 1`` prints it:
    ``"gpu[07-09,12],login1"`` -> ``"gpu07"`` (zero padding kept), ``"node3"`` -> ``"node3"``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


def launch_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch's launch variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, and for more than one
    process ``MASTER_ADDR``, ``MASTER_PORT``) of this process: those set (torchrun's), else
    SLURM's for a task of an ``srun`` job step (``SLURM_STEP_ID`` set: the batch script itself
    also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS``, but is one process, not rank 0 of N).
    Missing ones: one process."""
    env = os.environ if environ is None else environ
    slurm = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    out = {
        "RANK": env.get("RANK") or (env["SLURM_PROCID"] if slurm else "0"),
        "WORLD_SIZE": env.get("WORLD_SIZE") or (env["SLURM_NTASKS"] if slurm else "1"),
        "LOCAL_RANK": env.get("LOCAL_RANK") or (env.get("SLURM_LOCALID", "0") if slurm else "0"),
    }
    if int(out["WORLD_SIZE"]) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or (first_host(nodes) if slurm else "")
        # the same port on every node of the job, and another for another job on the same nodes
        job = env.get("SLURM_JOB_ID", "")
        port = 15000 + int(job) % 10000 if slurm and job.isdigit() else DEFAULT_PORT
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(port)
    return out


def env_rank() -> int:
    """This process's rank as the launcher (torchrun or srun) set it (0 without one); readable
    before any process group."""
    return int(launch_env()["RANK"])


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when visible), ``cuda`` (this rank's GPU) or ``cpu``. A rank that sees
    fewer GPUs than its local rank (a site binding one GPU to each task) takes
    ``local_rank % device_count``."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group of torchrun or srun (:func:`launch_env`) when there is more than
    one process (gloo on CPU, NCCL on CUDA). SLURM's values are exported under torch's names
    first, for torch's ``env://`` rendezvous (and for libraries that read them)."""
    env = launch_env()
    if "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" not in os.environ:
        if int(os.environ["SLURM_NTASKS"]) > 1 and env["WORLD_SIZE"] == "1":
            print(
                f"[tokenmorph] SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this process was not "
                "started by srun (or torchrun): running as one process; start it with srun "
                "(docs/cluster.md)",
                file=sys.stderr,
                flush=True,
            )
    world, rank, local_rank = (int(env[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if world > 1 and not env["MASTER_ADDR"]:
        raise ConfigError(
            f"WORLD_SIZE={world} without MASTER_ADDR: launch with torchrun or srun, or export "
            "MASTER_ADDR (and MASTER_PORT) to the address of rank 0"
        )
    if world > 1:
        os.environ.update(env)
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
