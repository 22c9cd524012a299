"""Pre-training end to end: the smoke config on a flat folder of real photos, exact resume,
torchrun."""

import json
import shutil
import subprocess
import sys

import numpy as np
import torch

from tokenmorph.models import create_student, timm_encoder_kwargs

from .helpers import final_weights, read_metrics, run_cli, run_torchrun, sigterm_after, smoke_args


def smoke(photo_dir, out, *extra, check=True):
    return run_cli(
        *smoke_args(str(photo_dir), str(out)),
        *extra,
        check=check,
    )


def test_smoke_run_writes_everything(photo_dir, tmp_path):
    out = tmp_path / "run"
    proc = smoke(photo_dir, out, "--max-steps", "8")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["finished"] and np.isfinite(summary["final_loss"])
    assert summary["images_seen"] == 64 and summary["skipped_images"] == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert records[0]["lr"] == 0.0 and records[2]["lr"] > records[-1]["lr"]  # warm-up then cosine
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_00000004.pt", "step_00000008.pt"]  # keep_last 2
    assert (out / "summary.json").exists() and (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").exists() and any((out / "tb").iterdir())
    ckpt = final_weights(out)
    assert ckpt["step"] == 8 and ckpt["kind"] == "pretrain"
    # the student encoder loads into timm's BEiT strictly
    import timm

    student = create_student(
        "tiny", target_dim=ckpt["target_dim"], img_size=32, patch_size=4, depth=2
    )
    student.load_state_dict(ckpt["model"])
    enc = timm.create_model(
        "beit_base_patch16_224", num_classes=0, global_pool="", **timm_encoder_kwargs(student.arch)
    )
    enc.load_state_dict(
        {k[len("encoder.") :]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    )


def test_resume_is_exact(photo_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    smoke(photo_dir, a, "--max-steps", "8")
    smoke(photo_dir, b, "--max-steps", "8", "stop_after=3")  # stops at step 3 with a checkpoint
    assert sorted(p.name for p in (b / "checkpoints").glob("*.pt"))[-1] == "step_00000003.pt"
    proc = smoke(photo_dir, b, "--max-steps", "8")  # resumes at step 3
    assert "resuming from" in proc.stdout
    la = [r["loss"] for r in read_metrics(a)]
    lb = [r["loss"] for r in read_metrics(b)]
    assert [r["step"] for r in read_metrics(b)] == list(range(1, 9))
    assert la == lb  # bit for bit on the CPU
    wa, wb = final_weights(a)["model"], final_weights(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_rejects_incompatible_run(photo_dir, tmp_path):
    out = tmp_path / "run"
    smoke(photo_dir, out, "--max-steps", "2")
    proc = smoke(photo_dir, out, "--max-steps", "2", "depth=3", check=False)
    assert proc.returncode == 2
    assert "depth: 2 -> 3  (the model is built from it)" in proc.stderr
    assert "--apply-changes" not in proc.stderr and "Traceback" not in proc.stderr


def test_bad_inputs_are_one_line(photo_dir, tmp_path):
    proc = smoke(photo_dir, tmp_path / "x", "lrr=1", check=False)
    assert (
        proc.returncode == 2
        and "unknown config key 'lrr'" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = smoke(empty, tmp_path / "y", check=False)
    assert proc.returncode == 2 and "no images" in proc.stderr and "Traceback" not in proc.stderr
    proc = smoke(photo_dir, tmp_path / "z", "batch_size=64", check=False)
    assert proc.returncode == 2 and "fewer than one global batch" in proc.stderr


def test_bad_files_are_skipped_and_counted(photo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "zero.jpg").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    raw = (photo_dir / "img_001.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    out = tmp_path / "run"
    proc = smoke(
        data, out, "--max-steps", "10", "batch_size=20"
    )  # 43 files: every file is seen in 2 epochs
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped_images"] >= 3 and summary["steps"] == 10
    assert read_metrics(out)[-1]["skipped_images"] == summary["skipped_images"]
    proc = smoke(
        data,
        tmp_path / "strict",
        "--max-steps",
        "10",
        "batch_size=20",
        "on_bad_image=raise",
        check=False,
    )
    assert proc.returncode != 0 and any(
        n in proc.stderr for n in ("zero.jpg", "text.png", "truncated.jpg")
    )


def test_torchrun_two_processes_match_one(photo_dir, tmp_path):
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
    ]
    run_cli("pretrain", *common, "--output-dir", str(one))
    proc = run_torchrun("pretrain", *common, "--output-dir", two, port=29517)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1, w2 = final_weights(one), final_weights(two)
    assert w2["world_size"] == 2
    for k in w1["model"]:
        torch.testing.assert_close(w1["model"][k], w2["model"][k], rtol=1e-4, atol=1e-5)
    l1 = [r["loss"] for r in read_metrics(one)]
    l2 = [r["loss"] for r in read_metrics(two)]
    np.testing.assert_allclose(l1, l2, rtol=1e-4)


def test_sigterm_to_the_process_group_saves_and_resumes(photo_dir, tmp_path):
    """Preemption: SIGTERM to the whole group (workers too) ends the step, saves, exits 2; rerun
    resumes."""

    out = tmp_path / "run"
    cmd = [
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
        "num_workers=2",
        "save_every=1000",
    ]
    returncode, err = sigterm_after(cmd + ["--max-steps", "500"], out, lines=3)
    assert returncode == 2, err[-2000:]
    assert "stopped by signal" in err and "Traceback" not in err
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    assert 3 <= step < 500
    resumed = subprocess.run(
        cmd + ["--max-steps", "500", "stop_after=2"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stdout, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == step + 2
