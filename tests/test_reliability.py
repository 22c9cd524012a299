"""Faults: SIGKILL at random moments and inside a checkpoint write, injected NaN losses, bad
checkpoints, resume with another number of processes. See docs/reliability.md."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from .helpers import final_weights, read_metrics, run_cli, run_torchrun, smoke_args


def smoke_cmd(photo_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "tokenmorph",
        "pretrain",
        "--config",
        "smoke",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        *extra,
    ]


def test_injected_nan_stops_with_step_and_last_checkpoint(photo_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TOKENMORPH_FAULT="nan@6")
    proc = subprocess.run(
        smoke_cmd(photo_dir, out, "--max-steps", "8"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "non-finite loss (nan) at step 6" in proc.stderr and "step_00000004.pt" in proc.stderr
    # the bad step never touched the weights: resuming (fault gone) gives the uninterrupted run
    # exactly
    run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "8",
    )
    ref = tmp_path / "ref"
    run_cli(
        *smoke_args(str(photo_dir), str(ref)),
        "--max-steps",
        "8",
    )
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ref)]


def test_injected_nan_skip_policy(photo_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TOKENMORPH_FAULT="nan@3")
    proc = subprocess.run(
        smoke_cmd(photo_dir, out, "--max-steps", "5", "nan_policy=skip"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss at step 3: step skipped" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5


def test_kill_during_checkpoint_write_keeps_previous(photo_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TOKENMORPH_FAULT="kill-in-save@4")
    proc = subprocess.run(
        smoke_cmd(photo_dir, out, "--max-steps", "6", "save_every=2"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_00000002.pt"]
    assert any(
        p.name.startswith(".tmp-step_00000004.pt") for p in ckpt_dir.iterdir()
    )  # the half-written file
    resumed = run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "6",
        "save_every=2",
    )
    assert "(step 2)" in resumed.stdout
    ref = tmp_path / "ref"
    run_cli(
        *smoke_args(str(photo_dir), str(ref)),
        "--max-steps",
        "6",
        "save_every=2",
    )
    wa, wb = final_weights(out)["model"], final_weights(ref)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_exact(photo_dir, tmp_path):
    """Kill -9 the run again and again at random moments of its training (checkpoint every step),
    resume each time. Each kill comes a random 0-3 s after the run has logged a new step, so it
    lands in training and checkpoint writes however slow the machine's start-up is."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = ("--max-steps", "60", "save_every=1", "keep_last=2")
    rng, metrics = random.Random(0), out / "metrics.jsonl"
    kills = 0
    for _ in range(40):
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = subprocess.Popen(
            smoke_cmd(photo_dir, out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) <= logged
        ):
            time.sleep(0.05)
        try:
            proc.wait(timeout=rng.uniform(0.0, 3.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        break
    else:
        raise AssertionError("the run never finished in 40 attempts")
    assert kills >= 2
    run_cli(
        "pretrain", "--config", "smoke", "--data", str(photo_dir), "--output-dir", str(ref), *args
    )
    wa, wb = final_weights(out)["model"], final_weights(ref)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_not_a_checkpoint_and_wrong_kind(photo_dir, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    for cmd in (
        ["export", str(bad), str(tmp_path / "e.safetensors")],
        ["eval", "knn", "--checkpoint", str(bad), "--dataset", "fashion-mnist"],
    ):
        proc = run_cli(*cmd, check=False)
        assert (
            proc.returncode == 2
            and "not a readable checkpoint" in proc.stderr
            and "Traceback" not in proc.stderr
        )
    # a checkpoint folder holding only an unreadable newest file falls back to the previous one
    out = tmp_path / "run"
    run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "4",
        "save_every=2",
    )
    newest = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "4",
        "save_every=2",
    )
    assert "skipping" in proc.stdout and "(step 2)" in proc.stdout


def test_resume_with_another_process_count(photo_dir, tmp_path):
    """2 processes for 2 steps, then 1 process to the end == 1 process throughout (fp32, no drop
    path)."""
    common = ["drop_path=0", "precision=fp32", "save_every=2"]
    mixed, ref = tmp_path / "mixed", tmp_path / "ref"
    args = smoke_args(str(photo_dir), str(mixed), "--max-steps", "4", "stop_after=2", *common)
    proc = run_torchrun(*args, port=29531)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = run_cli(
        *smoke_args(str(photo_dir), str(mixed)),
        "--max-steps",
        "4",
        *common,
    )
    assert "resuming a 2-process run with 1 processes" in resumed.stdout
    run_cli(
        *smoke_args(str(photo_dir), str(ref)),
        "--max-steps",
        "4",
        *common,
    )
    wa, wb = final_weights(mixed)["model"], final_weights(ref)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    proc = run_cli(
        *smoke_args(str(photo_dir), str(tmp_path / "odd")),
        "--max-steps",
        "2",
        "batch_size=6",
        "accum_steps=4",
        check=False,
    )
    assert proc.returncode == 2 and "not divisible by accum_steps" in proc.stderr
    # a batch that 2 processes cannot share: one line before any model is built
    args = smoke_args(str(photo_dir), str(tmp_path / "odd2"), "batch_size=7")
    proc = run_torchrun(*args, port=29533)
    assert (
        proc.returncode != 0
        and "batch_size=7 is not divisible by accum_steps x processes = 1 x 2" in proc.stderr
    )
    # torchrun's launcher prints its own traceback for a failed child; none may come from
    # tokenmorph's code
    assert not re.search(r'File "[^"]*/tokenmorph/', proc.stderr)
