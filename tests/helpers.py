"""Helpers shared by the end-to-end tests."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_cli(*args, check=True):
    """``tokenmorph ARGS`` in a subprocess, as a user runs it; with ``check``, a non-zero exit
    fails the test."""
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmorph", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tokenmorph {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n"
            f"{proc.stderr}"
        )
    return proc


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def random_masks(B, N, num_masked, seed=0):
    """(B, N) bool masks with ``num_masked`` True per row, each a seeded random subset."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:num_masked]] = True
    return mask


def final_weights(run_dir):
    """The newest checkpoint of a run folder, read as tokenmorph reads it (weights_only=True:
    every end-to-end test also checks that checkpoints hold only tensors and plain data)."""
    from tokenmorph.runtime.checkpoints import find_checkpoints, load_checkpoint

    return load_checkpoint(find_checkpoints(run_dir)[-1])


def run_main(capsys, *args):
    """``tokenmorph ARGS`` in this process (no interpreter start-up: seconds faster than
    :func:`run_cli`); returns (exit status, stdout, stderr)."""
    from tokenmorph.cli import main

    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def smoke_args(data, out, *extra):
    """The arguments of a smoke pre-training on ``data`` into ``out``."""
    return ("pretrain", "--config", "smoke", "--data", data, "--output-dir", out, *extra)


def last_json(out: str) -> dict:
    """The JSON object on the last line of a command's stdout (NaN refused: JSON has none)."""

    def no_nan(text):
        raise AssertionError(f"{text} in JSON output")

    return json.loads(out.strip().splitlines()[-1], parse_constant=no_nan)


def sigterm_after(cmd, run_dir, lines: int, timeout: float = 300) -> tuple[int, str]:
    """Start ``cmd`` (a training command writing into ``run_dir``) in its own process group, wait
    until its metrics.jsonl has ``lines`` lines, send SIGTERM to the group (as a cluster's
    scheduler does) and return (exit status, stderr)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < lines
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run_torchrun(*args, port: int, processes: int = 2, timeout: float = 600, env=None):
    """``torchrun --nproc_per_node PROCESSES -m tokenmorph ARGS`` on ``port``, one thread per
    process (2 cores here), in ``env`` (default: this process's environment); the completed
    process, its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["--master_port", str(port), "-m", "tokenmorph", *map(str, args)]
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
