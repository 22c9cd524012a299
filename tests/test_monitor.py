"""The k-NN monitor of pre-training and the loggers (csv, wandb): the monitor measures what
``tokenmorph eval knn`` measures, leaves the training bit for bit as it is (also across a
resume), and every record reaches metrics.jsonl, metrics.csv, TensorBoard and W&B."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmorph.data.labelled import EvalData
from tokenmorph.runtime.monitor import KnnMonitor

from .helpers import final_weights, last_json, read_metrics, run_main, run_torchrun, smoke_args

MONITOR = ("monitor_every=4", "monitor_limit=50", "monitor_bank=150")


def _monitor_points(run_dir):
    return [r for r in read_metrics(run_dir) if "knn_top1" in r]


def test_the_monitor_leaves_the_model_and_every_generator_as_they_were():
    from tokenmorph.models import create_student

    torch.manual_seed(0)
    student = create_student("tiny", target_dim=8, img_size=32, patch_size=4, depth=1).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = EvalData(dataset="fashion-mnist", limit_train=60, limit_val=30, seed=1)
    monitor = KnnMonitor(data, 32, torch.device("cpu"), k=5, batch_size=16)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    values = monitor(student)
    assert torch.equal(torch.get_rng_state(), rng)
    assert student.training
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert 0.0 <= values["knn_top1"] <= values["knn_top5"] <= 1.0 and values["knn_seconds"] > 0
    again = monitor(student)  # decoded views are cached: the same numbers
    assert (again["knn_top1"], again["knn_top5"]) == (values["knn_top1"], values["knn_top5"])


def test_monitoring_does_not_change_the_training_and_resume_stays_exact(tmp_path, capsys):
    """Three smoke runs on Fashion-MNIST: without the monitor, with it, with it and interrupted
    after 4 steps then resumed. The three train exactly the same weights; the monitor logs
    steps 0, 4 and 8 once each, and the last point is what `tokenmorph eval knn` measures on
    the final checkpoint with the same subsets."""
    runs = {}
    for name, extra in {
        "off": (),
        "on": MONITOR + ("loggers=tensorboard,csv",),
        "resumed": MONITOR + ("stop_after=4",),
    }.items():
        out = tmp_path / name
        status, stdout, err = run_main(capsys, *smoke_args("fashion-mnist", out, *extra))
        if name == "resumed":
            assert status == 0 and "k-NN monitor at step 4" in stdout, err
            status, stdout, err = run_main(capsys, *smoke_args("fashion-mnist", out, *MONITOR))
        assert status == 0, err
        runs[name] = out
    weights = {name: final_weights(out)["model"] for name, out in runs.items()}
    for k, v in weights["off"].items():
        assert torch.equal(weights["on"][k], v), k
        assert torch.equal(weights["resumed"][k], v), k
    assert "k-NN monitor at step 8: top-1" in stdout
    for name in ("on", "resumed"):
        points = _monitor_points(runs[name])
        assert [p["step"] for p in points] == [0, 4, 8], name
    assert [p["knn_top1"] for p in _monitor_points(runs["on"])] == [
        p["knn_top1"] for p in _monitor_points(runs["resumed"])
    ]
    assert not _monitor_points(runs["off"])
    summary = json.loads((runs["on"] / "summary.json").read_text())
    assert summary["monitor"]["knn_top1"] == _monitor_points(runs["on"])[-1]["knn_top1"]
    assert summary["monitor_seconds"] > 0
    # the same number as the evaluation program's, on the same fixed subsets (seed 0)
    status, out, err = run_main(
        capsys, "eval", "knn", "--checkpoint", runs["on"], "--dataset", "fashion-mnist",
        "--limit-train", "150", "--limit-val", "50", "--k", "20", "--no-progress",
        "--precision", "fp32",
    )  # fmt: skip
    assert status == 0, err
    assert abs(last_json(out)["top1"] - _monitor_points(runs["on"])[-1]["knn_top1"]) <= 0.021
    # metrics.csv: one row per record, the monitor's columns empty on the step rows
    rows = list(csv.DictReader((runs["on"] / "metrics.csv").open()))
    assert len(rows) == len(read_metrics(runs["on"]))
    assert [r["step"] for r in rows if r["knn_top1"]] == ["0", "4", "8"]
    assert rows[1]["loss"] and not rows[1]["knn_top1"]
    # TensorBoard holds the monitor's curve
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs["on"] / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("monitor/knn_top1")] == [0, 4, 8]


def test_monitor_and_logger_settings_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from tokenmorph.runtime import log_sinks

    cases = {
        "monitor_data=nowhere": "give fashion-mnist[:DIR] or TRAIN_DIR,VAL_DIR",
        f"monitor_data={tmp_path / 'a'},{tmp_path / 'b'}": "monitor_data=",
        "loggers=tensorboard,mlflow": "unknown mlflow; choose from tensorboard, csv, wandb",
        "monitor_every=0": "monitor_every=0 is below its minimum 1",
    }
    for i, (override, message) in enumerate(cases.items()):
        extra = (
            (override, "monitor_every=2") if override.startswith("monitor_data") else (override,)
        )
        status, _, err = run_main(capsys, *smoke_args("fashion-mnist", tmp_path / str(i), *extra))
        assert status == 2 and message in err and "Traceback" not in err, (override, err)
    # W&B: its package missing (as where it is not installed), then a setting W&B refuses
    with monkeypatch.context() as m:
        m.setattr(log_sinks, "_wandb_installed", lambda: False)
        status, _, err = run_main(
            capsys, *smoke_args("fashion-mnist", tmp_path / "w", "loggers=wandb")
        )
        assert status == 2 and "loggers=wandb needs the wandb package: pip install wandb" in err
    if log_sinks._wandb_installed():
        monkeypatch.setenv("WANDB_MODE", "offlin")
        monkeypatch.setenv("WANDB_SILENT", "true")
        status, _, err = run_main(
            capsys, *smoke_args("fashion-mnist", tmp_path / "m", "loggers=wandb")
        )
        assert status == 2 and "Traceback" not in err, err
        assert "loggers=wandb: W&B could not start its run" in err and "offlin" in err, err
        assert not _wandb_services()


def _wandb_services() -> list[str]:
    """The W&B service processes (``wandb-core --pid PID``) that serve this process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wandb-core") for a in args[:1]) and str(os.getpid()).encode() in args:
            found.append(proc.name)
    return found


def test_csv_resume_reads_as_one_run(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, err = run_main(
        capsys, *smoke_args("fashion-mnist", out, "loggers=csv", "stop_after=3", "save_every=2")
    )
    assert status == 0, err
    status, _, err = run_main(capsys, *smoke_args("fashion-mnist", out, "loggers=csv"))
    assert status == 0, err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [str(r["loss"]) for r in read_metrics(out)]


def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(tmp_path, capsys, monkeypatch):
    """W&B in offline mode (no network): the run folder gets one W&B run id, a resume logs to
    the same id, the offline run files hold the history of every step (read back with W&B's
    own records), and no W&B service process is left running."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = smoke_args("fashion-mnist", out, "loggers=tensorboard,wandb", "monitor_every=4",
                      "monitor_limit=50", "monitor_bank=100")  # fmt: skip
    status, _, err = run_main(capsys, *args, "stop_after=4")
    assert status == 0, err
    assert not _wandb_services()
    run_id = (out / "wandb_id.txt").read_text().strip()
    status, _, err = run_main(capsys, *args)
    assert status == 0, err
    assert not _wandb_services()
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, list((out / "wandb").iterdir())
    first, second = (_wandb_history(run / f"run-{run_id}.wandb") for run in runs)
    assert [row["_step"] for row in first] == list(range(0, 5))
    assert [row["_step"] for row in second] == list(range(5, 9))
    rows = first + second
    assert [row["_step"] for row in rows if "train/loss" in row] == list(range(1, 9))
    assert [row["_step"] for row in rows if "monitor/knn_top1" in row] == [0, 4, 8]
    # the values of metrics.jsonl
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row} == losses


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B file, read with W&B's own protobuf records: the file
    is a LevelDB-style log (a 7-byte header, 32 KiB blocks, each piece behind a <crc32, length,
    type> header; types FULL 1, FIRST 2, MIDDLE 3, LAST 4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (2, 3):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return rows


@pytest.mark.slow
def test_under_torchrun_the_main_process_monitors_and_the_others_wait(photo_dir, tmp_path):
    """Two processes with the monitor: they stay in step (the same weights as one process, up
    to the all-reduce's rounding), and the main process logs each monitor point once."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [
        "--config",
        "smoke",
        "--data",
        str(photo_dir),
        "--max-steps",
        "4",
        "drop_path=0",
        "precision=fp32",
        "monitor_every=2",
        "monitor_limit=40",
        "monitor_bank=80",
    ]
    status = subprocess.run(
        [sys.executable, "-m", "tokenmorph", "pretrain", *common, "--output-dir", str(one)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr[-3000:]
    proc = run_torchrun("pretrain", *common, "--output-dir", two, port=29531)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1, w2 = final_weights(one), final_weights(two)
    assert w2["world_size"] == 2
    for k in w1["model"]:
        torch.testing.assert_close(w1["model"][k], w2["model"][k], rtol=1e-4, atol=1e-5)
    assert [p["step"] for p in _monitor_points(two)] == [0, 2, 4]
    assert proc.stdout.count("k-NN monitor at step 2:") == 1
