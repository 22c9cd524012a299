"""The command line, end to end in a subprocess (as a user runs it)."""

import json

import pytest
import torch

from .helpers import run_cli


def test_help_lists_commands():
    out = run_cli("--help").stdout
    assert "bench" in out and "viz" in out
    assert "--json" in run_cli("bench", "morph", "--help").stdout
    assert "--out" in run_cli("viz", "morph", "--help").stdout


def test_viz_morph_real_photos(tmp_path):
    out = tmp_path / "groups.png"
    proc = run_cli(
        "viz",
        "morph",
        "skimage:astronaut",
        "skimage:coffee",
        "--groups",
        "196,49,8",
        "--out",
        str(out),
    )
    assert "2 images x 3 schedules" in proc.stdout
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_viz_morph_image_file_and_explicit_schedule(tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((100, 80, 3)) * 255).astype("uint8")).save(img)
    out = tmp_path / "g.png"
    run_cli(
        "viz",
        "morph",
        str(img),
        "--schedule",
        "14x14",
        "--schedule",
        "0",
        "--mode",
        "paper",
        "--out",
        str(out),
    )
    assert out.stat().st_size > 1000


def test_bench_morph_json_small():
    proc = run_cli(
        "bench",
        "morph",
        "--json",
        "--batch",
        "4",
        "--tokens",
        "49",
        "--dim",
        "16",
        "--schedule",
        "5x4",
        "--schedule",
        "0",
        "--repeats",
        "1",
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "morph"
    for key in ("tokenmorph_s", "dense_s", "speedup"):
        assert result[key] > 0
    assert result["loss_abs_diff"] < 1e-6 and result["grad_max_abs_diff"] < 1e-6


@pytest.mark.parametrize(
    "args,message",
    [
        (["viz", "morph", "--out", "x.png", "--schedule", "fourteen"], "bad schedule"),
        (["viz", "morph", "--out", "x.png", "--groups", "500"], "out of range"),
        (["viz", "morph", "/nonexistent/photo.jpg", "--out", "x.png"], "image not found"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_not_an_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    proc = run_cli("viz", "morph", str(bad), "--out", str(tmp_path / "o.png"), check=False)
    assert (
        proc.returncode == 2
        and "cannot decode image" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_bench_pretrain_json_small():
    proc = run_cli(
        "bench",
        "pretrain",
        "--json",
        "--model",
        "tiny",
        "--teacher",
        "pixels",
        "--img-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "1",
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["benchmark"] == "pretrain" and r["images_per_second"] > 0
    assert set(r["phases_s"]) == {
        "teacher",
        "student_forward",
        "morph_loss",
        "backward",
        "optimizer",
    }
    assert r["model_flops_per_step"] > 0 and 0 < r["fraction_of_peak"] < 2
    assert sum(r["phases_flops"].values()) == r["model_flops_per_step"]
    assert set(r["phases_fraction_of_peak"]) == set(r["phases_s"])
    assert r["peak_ratio_vs_fp32"] > 0 and r["attention"]["kernel"] in ("sdpa", "explicit")
    assert r["attention"]["fastest"] in ("sdpa", "explicit") and r["attention"]["sdpa_s"] > 0
    assert r["speedup_vs_release_over_peak_ratio"] == pytest.approx(
        r["speedup_vs_release"] / r["peak_ratio_vs_fp32"]
    )
    assert r["baseline"]["images_per_second"] > 0 and r["speedup_vs_release"] > 0
    assert r["measurement"].startswith("each round: one step of every setup")  # interleaved
    # the release's work: fp32 on a CPU (its torch.cuda.amp.autocast does nothing there), fp16 on
    # CUDA; fused teacher attention, explicit student attention with both position tables
    from tokenmorph.bench.release import release_precision

    assert r["baseline"]["precision"] == "fp32" and release_precision("cuda") == torch.float16
    assert (
        "fused teacher" in r["baseline"]["what"] and "per-block + shared" in r["baseline"]["what"]
    )
