"""Helpers shared by the end-to-end tests."""

import json
import subprocess
import sys
from pathlib import Path

import torch


def run_cli(*args, check=True):
    """``tokenmorph ARGS`` in a subprocess, as a user runs it; with ``check``, a non-zero exit
       fails
    the test."""
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


def final_weights(run_dir):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False)


def random_masks(B, N, num_masked, seed=0):
    """(B, N) bool masks with ``num_masked`` True per row, each a seeded random subset."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:num_masked]] = True
    return mask
