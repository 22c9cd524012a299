"""Launching on clusters: SLURM's ``srun`` (no torchrun) as well as torchrun.

The SLURM path is exercised as srun starts it: two local processes that see only SLURM's
variables (no RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*), joined over gloo.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from tokenmorph.runtime.distributed import first_host, launch_env

from .helpers import final_weights, read_metrics, run_torchrun

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(rank: int, ntasks: int, **extra) -> dict:
    """The environment srun gives task ``rank`` of a one-node job step (torch's own variables
    removed, as under srun without torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS}
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        SLURM_NTASKS=str(ntasks),
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def srun_two(cmd: list, timeout: int) -> list[str]:
    """``cmd`` as srun starts it on two tasks of one node (a free port for the rendezvous); the
    two stdouts, after both succeeded."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            cmd,
            env=slurm_env(r, 2, MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    return [o[0] for o in outs]


@pytest.mark.parametrize(
    "nodes, host",
    [
        ("gpu[07-09,12],login1", "gpu07"),
        ("node3", "node3"),
        ("a[9-11]", "a9"),
        ("n[01-02]-ib,x", "n01-ib"),
        ("c[3]", "c3"),
    ],
)
def test_first_host_is_what_scontrol_prints_first(nodes, host):
    assert first_host(nodes) == host


def test_launch_env_maps_slurm_onto_torch_and_set_values_win():
    task = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "11",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "123456",
    }
    assert launch_env(task) == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "gpu01",
        "MASTER_PORT": str(15000 + 123456 % 10000),
    }
    # the step's own node list first (a step on a subset of the job's nodes)
    assert launch_env({**task, "SLURM_STEP_NODELIST": "gpu02"})["MASTER_ADDR"] == "gpu02"
    # torchrun started by srun: torchrun's values win; so do an exported address and port
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert launch_env({**task, **torchrun, "MASTER_PORT": "7"}) == {**torchrun, "MASTER_PORT": "7"}
    # the batch script itself (no job step): one process, not rank 0 of 16
    batch = {k: v for k, v in task.items() if k != "SLURM_STEP_ID"}
    assert launch_env(batch) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert launch_env({}) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


JOIN = "\n".join(  # a script for python -c: every rank prints its place and the sum
    [
        "import os",
        "from tokenmorph.runtime.distributed import all_reduce, init_distributed,"
        " shutdown_distributed",
        'info = init_distributed("cpu")',
        "total = all_reduce(info, float(info.rank + 1))",
        "print(info.rank, info.world_size, info.local_rank, total,"
        ' os.environ.get("MASTER_ADDR"), flush=True)',
        "shutdown_distributed()",
    ]
)


def test_two_srun_style_processes_join_one_group():
    """Two processes with SLURM's variables only: ranks 0 and 1 of 2, one all-reduce across
    them (gloo), the rendezvous address taken from the node list."""
    outs = srun_two([sys.executable, "-c", JOIN], timeout=300)
    lines = sorted(o.split() for o in outs)
    assert lines == [["0", "2", "0", "3.0", "localhost"], ["1", "2", "1", "3.0", "localhost"]]


def test_batch_script_without_srun_runs_one_process_and_says_so():
    env = slurm_env(0, 16)
    del env["SLURM_STEP_ID"]  # the batch shell: SLURM_PROCID=0 and SLURM_NTASKS=16, no step
    proc = subprocess.run(
        [sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:4] == ["0", "1", "0", "1.0"] and "srun" in proc.stderr


@pytest.mark.slow
def test_srun_style_pretraining_trains_the_same_weights_as_torchrun(photo_dir, tmp_path):
    """A 4-step smoke pre-training by two SLURM-style processes and by torchrun with two: the
    same checkpoint, bit for bit, and the same losses."""
    slurm, torchrun = tmp_path / "slurm", tmp_path / "torchrun"
    common = ["pretrain", "--config", "smoke", "--data", str(photo_dir), "--max-steps", "4"]
    common += ["drop_path=0", "precision=fp32"]
    srun_two([sys.executable, "-m", "tokenmorph", *common, "--output-dir", str(slurm)], 600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = run_torchrun(*common, "--output-dir", torchrun, port=free_port(), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_weights(slurm), final_weights(torchrun)
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss"] for r in read_metrics(slurm)] == [r["loss"] for r in read_metrics(torchrun)]
