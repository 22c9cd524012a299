"""What a rerun of a run folder means (issue 14, items 1-3, 12, 17, 18): changed settings or data
are refused key by key or applied by a documented rule, the run folder never trains on itself, a
finished run stays as it is, every start is recorded, TensorBoard keeps every point. See
docs/reliability.md."""

import json
import shutil

import yaml

from tokenmorph.data import ImageFiles

from .helpers import last_json, read_metrics, run_main, smoke_args


def snapshot(run_dir):
    """Every file of a run folder (the lock file aside) with its bytes and modification time."""
    return {
        p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "run_history.jsonl").read_text().splitlines()]


def test_changed_settings_are_refused_key_by_key_before_any_work(photo_dir, tmp_path, capsys):
    """Item 1: keys that change the run's meaning are refused, one line each (old -> new), with
    the two ways out; keys that do not change training pass and are logged."""
    out = tmp_path / "run"
    assert run_main(capsys, *smoke_args(photo_dir, out, "--max-steps", "8", "stop_after=4"))[0] == 0
    before = snapshot(out)
    status, stdout, err = run_main(
        capsys,
        *smoke_args(photo_dir, out, "--max-steps", "20", "lr=5e-2", "seed=1", "num_masked=20"),
    )
    assert status == 2 and "Traceback" not in err
    lines = err.splitlines()
    for change in (
        "lr: 0.001 -> 0.05",
        "max_steps: 8 -> 20",
        "seed: 0 -> 1",
        "num_masked: 24 -> 20",
    ):
        assert f"  {change}" in lines, err
    assert "--output-dir" in lines[-1] and "--apply-changes" in lines[-1] and "step 4" in lines[-1]
    assert "starting" not in stdout and "resuming" not in stdout  # refused before any work
    assert snapshot(out) == before
    # logging, saving, workers, device, stop_after: accepted and logged
    status, stdout, _ = run_main(
        capsys,
        *smoke_args(
            photo_dir, out, "--max-steps", "8", "num_workers=1", "log_every=2", "--device", "cpu"
        ),
    )
    assert status == 0 and last_json(stdout)["finished"]
    assert "settings changed since the checkpoint (training unchanged):" in stdout
    assert "num_workers: 0 -> 1" in stdout and "stop_after: 4 -> None" in stdout


def test_apply_changes_goes_on_as_a_run_configured_so_from_its_start(photo_dir, tmp_path, capsys):
    """Item 1: --apply-changes applies the new values from the current step; the schedules are
    those of a run configured with them from the start (raising max_steps 8 -> 12 does not train
    steps 9-12 at min_lr), and the change is recorded."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert run_main(capsys, *smoke_args(photo_dir, run, "--max-steps", "8"))[0] == 0
    new = ("--max-steps", "12", "lr=5e-3")
    status, stdout, _ = run_main(capsys, *smoke_args(photo_dir, run, *new, "--apply-changes"))
    assert status == 0 and "applying changed settings from step 8" in stdout
    assert "max_steps: 8 -> 12" in stdout and "lr: 0.001 -> 0.005" in stdout
    assert run_main(capsys, *smoke_args(photo_dir, ref, *new))[0] == 0
    lr_run = {r["step"]: r["lr"] for r in read_metrics(run)}
    lr_ref = {r["step"]: r["lr"] for r in read_metrics(ref)}
    assert [lr_run[s] for s in range(9, 13)] == [lr_ref[s] for s in range(9, 13)]
    assert lr_run[9] > 10 * lr_run[8] and lr_run[9] > 100 * 1e-5  # far above min_lr
    changes = {c["key"]: c for c in history(run)[-1]["changes"]}
    assert changes["lr"] == {"key": "lr", "old": 0.001, "new": 0.005, "kind": "meaning"}
    assert changes["max_steps"]["new"] == 12


def test_changed_data_is_refused_like_a_changed_setting(photo_dir, tmp_path, capsys):
    """Item 2: the data's fingerprint (count, names, sampled contents) is recorded at the start
    and checked on resume."""
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(photo_dir, data)
    args = smoke_args(data, out, "--max-steps", "4")
    assert run_main(capsys, *args, "stop_after=2")[0] == 0
    shutil.copy(data / "img_001.jpg", data / "added.jpg")
    status, _, err = run_main(capsys, *args)
    assert status == 2 and "  data set: 40 images (names" in err and "-> 41 images" in err
    (data / "added.jpg").unlink()
    files = ImageFiles(data).files  # same names, one file rewritten
    files[0].write_bytes(files[1].read_bytes())
    status, _, err = run_main(capsys, *args)
    assert status == 2 and "data set: 40 images" in err and "-> 40 images" in err
    status, stdout, _ = run_main(capsys, *args, "--apply-changes")
    assert status == 0 and "applying changed settings from step 2" in stdout
    changes = history(out)[-1]["changes"]
    assert [c["key"] for c in changes if c["kind"] != "free"] == ["data set"]


def test_a_run_folder_inside_the_data_is_refused_or_left_out(photo_dir, tmp_path, capsys):
    """Item 3: an output folder inside the data folder is refused unless allowed; allowed, the
    run folder (its loss_curve.png) is never part of the data."""
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    args = smoke_args(data, data / "run", "--max-steps", "4")
    status, _, err = run_main(capsys, *args)
    assert status == 2 and "is inside the data folder" in err and "allow_output_in_data" in err
    assert not (data / "run").exists()
    status, stdout, _ = run_main(capsys, *args, "stop_after=2", "allow_output_in_data=true")
    assert status == 0 and "40 images" in stdout
    assert (data / "run" / "loss_curve.png").exists()
    status, stdout, _ = run_main(capsys, *args, "allow_output_in_data=true")
    assert status == 0 and "40 images" in stdout and last_json(stdout)["finished"]


def test_a_finished_run_stays_as_it_is_and_every_start_is_recorded(photo_dir, tmp_path, capsys):
    """Items 12 and 17: stop_after does not say done; a finished run rerun says so and changes
    nothing; config.yaml keeps the start's settings, run_history.jsonl has one record per start
    or resume."""
    out = tmp_path / "run"
    status, stdout, _ = run_main(
        capsys, *smoke_args(photo_dir, out, "--max-steps", "4", "stop_after=2")
    )
    assert status == 0 and "done" not in stdout and "stopped at step 2 of 4" in stdout
    assert not last_json(stdout)["finished"]
    status, stdout, _ = run_main(
        capsys, *smoke_args(photo_dir, out, "--max-steps", "4", "num_workers=1")
    )
    assert status == 0 and "done: 4 steps" in stdout
    files = snapshot(out)
    status, stdout, _ = run_main(capsys, *smoke_args(photo_dir, out, "--max-steps", "4"))
    assert status == 0 and f"the run in {out} is finished (step 4 of 4" in stdout
    summary = last_json(stdout)
    assert summary["already_finished"] and summary["steps"] == 4 and summary["img_per_s"] > 0
    assert snapshot(out) == files  # summary.json, checkpoints, logs, history: untouched
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["num_workers"] == 0 and config["stop_after"] == 2  # what the run started with
    records = history(out)
    assert [(r["event"], r["step"]) for r in records] == [("start", 0), ("resume", 2)]
    for r in records:
        assert set(r) >= {"time", "command", "changes", "processes", "host", "versions"}
        assert r["processes"] == 1 and "pretrain" in r["command"]
        assert set(r["versions"]) == {"tokenmorph", "torch", "timm"}
    assert {"key": "num_workers", "old": 0, "new": 1, "kind": "free"} in records[1]["changes"]


def test_no_nan_is_written_as_json(photo_dir, tmp_path, capsys, monkeypatch):
    """Item 12: a run without a finite loss writes null, never NaN (invalid JSON)."""
    monkeypatch.setenv("TOKENMORPH_FAULT", "nan@1")
    out = tmp_path / "run"
    status, stdout, _ = run_main(
        capsys, *smoke_args(photo_dir, out, "--max-steps", "1", "nan_policy=skip")
    )
    assert status == 0 and last_json(stdout)["final_loss"] is None
    assert last_json((out / "summary.json").read_text().replace("\n", " "))["skipped_steps"] == 1
    assert read_metrics(out)[0]["loss"] is None


def test_tensorboard_keeps_every_point_across_resumes(photo_dir, tmp_path, capsys):
    """Item 18: resumed after a stop (the checkpoint's own point was logged) and after a crash
    (points past the checkpoint were logged and are trained again): every step appears once,
    with the values of metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = smoke_args(photo_dir, out, "--max-steps", "6", "save_every=2", "keep_last=3")
    assert run_main(capsys, *args, "stop_after=3")[0] == 0
    assert run_main(capsys, *args)[0] == 0
    (out / "checkpoints" / "step_00000006.pt").unlink()  # a crash after logging steps 5 and 6
    (out / "summary.json").unlink()
    status, stdout, _ = run_main(capsys, *args)
    assert status == 0 and "(step 4)" in stdout
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    points = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in read_metrics(out)]
    assert all(abs(v - loss) <= 1e-6 * abs(loss) for (_, v), loss in zip(points, losses))
