"""The adversarial run of issue 14, kept as tests (items 4-11, 13-16, 19; items 1-3, 12, 17, 18
are in test_resume_semantics.py): unreadable data, hangs, foreign code in checkpoint files,
full disks, concurrent runs, lost processes, bad values and paths. See docs/reliability.md."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmorph.cli import main
from tokenmorph.data import ImageFiles, open_rgb
from tokenmorph.errors import ConfigError, DataError
from tokenmorph.recipes.config import load_config
from tokenmorph.runtime.checkpoints import find_checkpoints, load_checkpoint

from .helpers import last_json, read_metrics, run_cli, run_main, smoke_args


@pytest.fixture(scope="module")
def pretrained(photo_dir, tmp_path_factory):
    """A finished 4-step smoke pre-training (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("adversarial") / "run"
    args = smoke_args(photo_dir, out, "--max-steps", "4", "save_every=2")
    assert main([str(a) for a in args]) == 0
    return out


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmorph: error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), err


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging forever) when the block blocks longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------ 4: unreadable data
def test_a_folder_of_undecodable_files_stops_without_training(tmp_path, capsys):
    """Item 4: no image decodes: the run stops with one line after a window of empty steps, not
    "finished"; no step changed the weights (no weight decay on nothing)."""
    from tokenmorph.recipes.pretrain import build_student_and_teacher

    data, out = tmp_path / "junk", tmp_path / "run"
    data.mkdir()
    for i in range(10):
        (data / f"{i}.png").write_text("not an image")
    status, _, err = run_main(capsys, *smoke_args(data, out, "--max-steps", "8"))
    one_error_line(err, "no image could be decoded in the last 8 steps", "stopped at step 8")
    assert status == 2 and not (out / "summary.json").exists()
    assert [p.name for p in find_checkpoints(out)] == ["step_00000004.pt"]
    ckpt = load_checkpoint(out / "checkpoints" / "step_00000004.pt")
    assert ckpt["images_seen"] == 0 and ckpt["skipped_steps"] == 4
    cfg = load_config("smoke", {"data": str(data)})
    student, _ = build_student_and_teacher(cfg, torch.device("cpu"))
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"framework": "mae", "teacher": "pixels", "mask_ratio": "0"}, "masks 0 of 64 tokens"),
        ({"teacher": "pixels", "num_masked": "0"}, "num_masked=0: the loss covers the masked"),
        ({"min_lr": "1.0"}, "min_lr=1 is above the learning rate 0.001"),
        ({"min_mask_block": "65"}, "min_mask_block=65 exceeds the 64 patches"),
    ],
)
def test_settings_that_train_nothing_are_refused(overrides, message):
    """Item 4: a zero loss, a climbing cosine, a mask block larger than the grid."""
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides)


# ------------------------------------------------------------------------ 5: EXIF orientation
def test_exif_orientation_is_applied(tmp_path):
    """Item 5: an orientation-6 JPEG (stored sideways) loads upright, as exif_transpose turns it."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "o6.jpg", exif=exif.tobytes(), quality=95)
    im = open_rgb(tmp_path / "o6.jpg")
    assert im.size == (32, 48)  # (width, height): upright is 32 wide, 48 high
    shown = np.asarray(im).mean(axis=2)
    assert shown[:8].mean() > 200 and shown[-8:].mean() < 50  # the band is now on top


# ------------------------------------------------------------------------ 6, 7: hangs
def test_on_bad_image_raise_with_workers_ends_with_one_line(photo_dir, tmp_path):
    """Item 6: a worker's decoding error ends the main process (no wait for the workers, which
    ignore SIGTERM), with one line naming the file."""
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "aaa_broken.png").write_text("not an image")
    args = smoke_args(data, tmp_path / "run", "--max-steps", "10", "batch_size=20")
    cmd = [sys.executable, "-m", "tokenmorph", *map(str, args), "num_workers=2"]
    proc = subprocess.run(cmd + ["on_bad_image=raise"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    one_error_line(proc.stderr, "cannot decode image", "aaa_broken.png")


def test_only_regular_files_are_read(photo_dir, tmp_path):
    """Item 7: a FIFO named like an image is left out of the data (open() would block on it) and
    refused by open_rgb without being opened."""
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    os.mkfifo(data / "x.png")
    found = ImageFiles(data)
    assert len(found) == 40 and found.irregular == [data / "x.png"]
    with deadline(30), pytest.raises(DataError, match="is not a regular file"):
        open_rgb(data / "x.png")


# ------------------------------------------------------------------------ 8: one run per folder
def test_a_second_run_on_a_folder_is_refused_and_the_lock_never_goes_stale(
    photo_dir, tmp_path, capsys
):
    """Item 8: an exclusive lock on the run folder; a second run is refused with one line; a
    killed holder's lock is released by the OS (no stale lock)."""
    out = tmp_path / "run"
    args = [str(a) for a in smoke_args(photo_dir, out, "--max-steps", "400", "save_every=1000")]
    first = subprocess.Popen([sys.executable, "-m", "tokenmorph", *args], stdout=subprocess.DEVNULL)
    try:
        metrics, end = out / "metrics.jsonl", time.time() + 300
        while time.time() < end and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.2)
        status, stdout, err = run_main(capsys, *args)
        assert status == 2 and "starting" not in stdout
        one_error_line(err, f"{out} is in use by another tokenmorph run (pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    status, stdout, _ = run_main(capsys, *args, "stop_after=1")
    assert status == 0 and "starting" in stdout


# ------------------------------------------------------------------------ 9, 10: checkpoint files
class RunsCode:
    """Unpickling this runs a shell command (what a planted checkpoint file could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_never_run_code(pretrained, photo_dir, tmp_path, capsys):
    """Item 9: every checkpoint is read with weights_only=True: a planted file is refused,
    naming what it calls, on resume, export and eval; the run's own checkpoints load."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(pretrained, run)
    planted = run / "checkpoints" / "step_00000099.pt"
    torch.save({"format": "tokenmorph-checkpoint-v1", "x": RunsCode(marker)}, planted)
    args = smoke_args(photo_dir, run, "--max-steps", "4", "save_every=2")
    status, stdout, _ = run_main(capsys, *args)  # the resume skips it, naming the call
    assert (
        "step_00000099.pt is not loaded: it needs code to unpickle (it calls posix.system)"
        in stdout
    )
    assert status == 0 and "is finished (step 4 of 4" in stdout
    status, _, err = run_main(capsys, "export", planted, tmp_path / "e.safetensors")
    assert status == 2
    one_error_line(err, "it calls posix.system", "not written by tokenmorph")
    status, _, err = run_main(capsys, "eval", "knn", "--checkpoint", planted, "--dataset", "x")
    assert status == 2 and "it calls posix.system" in err
    status, out, err = run_main(capsys, "export", run, tmp_path / "ok.safetensors")
    assert status == 0 and "(step 4)" in out and "step_00000099.pt is not loaded" in err
    assert not marker.exists()


def test_only_well_formed_readable_checkpoints_count(photo_dir, tmp_path, capsys):
    """Item 10: step_XXXX.pt and other names are ignored; an unreadable step_00000099.pt is
    reported, left alone, and never counted toward keep_last."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_XXXX.pt").write_text("junk")
    (out / "checkpoints" / "step_1.pt").write_text("junk")
    (out / "checkpoints" / "step_00000099.pt").write_bytes(os.urandom(4096))
    args = smoke_args(photo_dir, out, "--max-steps", "6", "save_every=2", "keep_last=2")
    status, stdout, _ = run_main(capsys, *args)
    assert status == 0 and "starting" in stdout
    assert stdout.count("step_00000099.pt is not a readable checkpoint") == 2  # resume, keep_last
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    kept = ["step_00000004.pt", "step_00000006.pt"]  # keep_last=2 real ones
    assert names == kept + ["step_00000099.pt", "step_1.pt", "step_XXXX.pt"]
    status, stdout, _ = run_main(capsys, "export", out, tmp_path / "e.safetensors")
    assert status == 0 and "(step 6)" in stdout


# ------------------------------------------------------------------------ 11: a full disk
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    photo_dir, tmp_path, capsys, monkeypatch
):
    """Item 11: ENOSPC while writing step 4's checkpoint (injected halfway through the write):
    one line naming the path and the bytes needed, the temporary file removed, step 2 kept; the
    rerun resumes from it."""
    out = tmp_path / "run"
    args = smoke_args(photo_dir, out, "--max-steps", "6", "save_every=2", "keep_last=1")
    monkeypatch.setenv("TOKENMORPH_FAULT", "enospc@4")
    status, _, err = run_main(capsys, *args)
    one_error_line(err, "no space left on device (", "step_00000004.pt, ", " bytes needed")
    assert status == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    monkeypatch.delenv("TOKENMORPH_FAULT")
    status, stdout, _ = run_main(capsys, *args)
    assert status == 0 and "(step 2)" in stdout and last_json(stdout)["finished"]


# ------------------------------------------------------------------------ 13: one rank signalled
def signal_rank_1(photo_dir, out, port, sig) -> str:
    """A 2-process torchrun pre-training; once it has logged 2 steps, ``sig`` to rank 1's
    process only. Returns the launcher's stderr (after checking it failed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", "tokenmorph"]
    cmd += [str(a) for a in smoke_args(photo_dir, out, "--max-steps", "400", "save_every=1000")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    metrics, end = out / "metrics.jsonl", time.time() + 300
    while time.time() < end and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 2
    ):
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    ranks = {
        pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for pid in map(int, children.stdout.split())
    }
    (rank_1,) = [pid for pid, env in ranks.items() if b"RANK=1" in env]
    os.kill(rank_1, sig)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    return err


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(photo_dir, tmp_path):
    """Item 13: SIGTERM to rank 1 only: the stop flag travels in the step's all-reduce, every
    rank stops after the same step, rank 0 saves it and says so in one line."""
    out = tmp_path / "run"
    err = signal_rank_1(photo_dir, out, 29541, signal.SIGTERM)
    (line,) = [x for x in err.splitlines() if x.startswith("tokenmorph: error:")]
    assert "stopped by a signal (it reached 1 of the 2 processes) at step" in line
    step = int(line.split(" at step ")[1].split(";")[0])
    assert [p.name for p in find_checkpoints(out)] == [f"step_{step:08d}.pt"]
    assert read_metrics(out)[-1]["step"] == step
    assert load_checkpoint(find_checkpoints(out)[0])["world_size"] == 2


@pytest.mark.slow
def test_a_killed_rank_is_one_line(photo_dir, tmp_path):
    """Item 13: SIGKILL to rank 1: rank 0 ends with one line saying a process was lost (the
    launcher's own report follows), no traceback of tokenmorph's code."""
    err = signal_rank_1(photo_dir, tmp_path / "run", 29543, signal.SIGKILL)
    (line,) = [x for x in err.splitlines() if x.startswith("tokenmorph: error:")]
    assert "another process of this 2-process run failed or was killed during step" in line
    assert "tokenmorph/runtime" not in err and "last checkpoint: none yet" in line


# ------------------------------------------------------------------------ 14, 15: values, paths
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", "nan", "lr=nan is not a finite number"),
        ("lr", "inf", "lr=inf is not a finite number"),
        ("beta2", "1.0", "beta2=1.0 must be below 1.0"),
        ("depth", "1000000", "depth=1000000 is above its maximum 128"),
        ("img_size", "100000", "img_size=100000 is above its maximum 4096"),
        ("max_steps", "0", "max_steps=0 is below its minimum 1"),
    ],
)
def test_impossible_values_are_refused(key, value, message):
    """Item 14 (the --max-steps flag goes through the same check: see the next test)."""
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", {key: value})


def test_bad_output_folders_are_one_line_before_any_work(photo_dir, tmp_path, capsys):
    """Items 14, 15: --max-steps 0, an output folder that is a file, under a file, or read-only:
    one line, nothing built or written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    if os.geteuid() == 0:  # root writes through permissions: a place nobody may create in
        read_only = Path("/sys/tokenmorph-test/run")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        read_only = tmp_path / "ro" / "run"
    cases = [
        (tmp_path / "run0", ("--max-steps", "0"), "max_steps=0 is below its minimum 1"),
        (a_file, (), f"--output-dir {a_file} is a file"),
        (a_file / "run", (), f"is under {a_file}, which is a file"),
        (read_only, (), f"--output-dir {read_only} cannot be written"),
    ]
    for out, extra, message in cases:
        status, stdout, err = run_main(capsys, *smoke_args(photo_dir, out, *extra))
        assert status == 2 and "starting" not in stdout
        one_error_line(err, message)
    assert not (tmp_path / "run0").exists()


# ------------------------------------------------------------------------ 16: tracebacks
def test_eval_skips_an_undecodable_first_file(pretrained, class_tree, tmp_path, capsys):
    """Item 16: the first file of the training tree does not decode: it is skipped and counted."""
    train = tmp_path / "train"
    shutil.copytree(class_tree / "train", train)
    (train / "astronaut" / "!broken.png").write_text("not an image")
    assert ImageFiles(train).files[0].name == "!broken.png"
    status, out, err = run_main(
        capsys, "eval", "knn", "--checkpoint", pretrained, "--train", train,
        "--val", class_tree / "val", "--num-workers", "0",
    )  # fmt: skip
    assert status == 0, err
    assert last_json(out)["skipped_images"] == 1


def test_viz_morph_on_a_decompression_bomb_is_one_line(tmp_path):
    """Item 16: a PNG declaring 17000 x 17000 pixels (over the bound, under twice PIL's own):
    one line, without PIL's warning (a subprocess: pytest would capture the warning)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 17000, 17000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )
    proc = run_cli("viz", "morph", bomb, "--out", tmp_path / "m.png", check=False)
    assert proc.returncode == 2
    one_error_line(proc.stderr, "DecompressionBombError", "289000000 pixels is over the limit")


def test_a_huge_picture_is_reduced_before_the_float_resize(tmp_path, monkeypatch):
    """Item 16: load_image's memory is bounded by the 8-bit image: a large picture is box-reduced
    by an integer factor before the float crop and resize (a 16000 x 16000 one would take
    gigabytes as floats); pictures below 4 x the side are untouched."""
    from tokenmorph.data import images

    seen = []
    resize = images.to_square_tensor
    monkeypatch.setattr(
        images, "to_square_tensor", lambda a, size: seen.append(a.shape) or resize(a, size)
    )
    for side in ((2000, 1800), (800, 890)):
        Image.new("RGB", side, (200, 10, 10)).save(tmp_path / "big.png")
        out = images.load_image(tmp_path / "big.png", 224)
        assert out.shape == (3, 224, 224) and abs(float(out[0].mean()) - 200 / 255) < 1e-3
    assert seen == [(450, 500, 3), (890, 800, 3)]  # factor 4; below 4 x 224: as it is


def test_a_wrong_shape_weight_is_one_line_everywhere(pretrained, photo_dir, tmp_path, capsys):
    """Item 16: a checkpoint whose tensor has another shape: resume, eval, fine-tune, export."""
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    shutil.rmtree(run / "checkpoints")
    ckpt = load_checkpoint(pretrained / "checkpoints" / "step_00000002.pt")
    key = "encoder.patch_embed.proj.weight"
    ckpt["model"][key] = torch.zeros(3, 3)
    path = run / "checkpoints" / "step_00000002.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    commands = [
        (smoke_args(photo_dir, run, "--max-steps", "4", "save_every=2"), "weights do not fit"),
        (("eval", "knn", "--checkpoint", path, "--dataset", "fashion-mnist"), "do not fit"),
        (
            (
                "finetune",
                "--config",
                "fashion-mnist-tiny",
                "--checkpoint",
                path,
                "--output-dir",
                tmp_path / "ft",
            ),
            "do not fit",
        ),  # fmt: skip
        (("export", path, tmp_path / "e.safetensors"), "patch_embed.proj.weight"),
    ]
    for args, message in commands:
        status, _, err = run_main(capsys, *args)
        assert status == 2
        one_error_line(err, message)


def test_export_refuses_folders_read_only_places_and_existing_files(pretrained, tmp_path, capsys):
    """Item 16: export onto a folder, into a read-only place, onto an existing file (--force
    overwrites)."""
    target = tmp_path / "enc.safetensors"
    target.mkdir()
    status, _, err = run_main(capsys, "export", pretrained, target)
    one_error_line(err, f"{target} is a folder")
    target.rmdir()
    ro = Path("/sys/tokenmorph-test") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir(mode=0o555)
    status, _, err = run_main(capsys, "export", pretrained, ro / "enc.safetensors")
    one_error_line(err, f"cannot write {ro / 'enc.safetensors'}")
    assert run_main(capsys, "export", pretrained, target)[0] == 0
    before = target.stat().st_mtime_ns
    status, _, err = run_main(capsys, "export", pretrained, target)
    one_error_line(err, f"{target} exists; pass --force")
    assert status == 2 and target.stat().st_mtime_ns == before
    assert run_main(capsys, "export", pretrained, target, "--force")[0] == 0


def test_base_is_resolved_against_the_file_that_names_it(tmp_path, monkeypatch):
    """Item 16: ``base: parent.yaml`` is next to the file, wherever the command runs."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "parent.yaml").write_text("base: smoke\nlr: 2.0e-3\n")
    (configs / "child.yaml").write_text("base: parent.yaml\nbatch_size: 4\n")
    monkeypatch.chdir(tmp_path)  # not the configs' folder
    cfg = load_config(str(configs / "child.yaml"))
    assert (cfg.lr, cfg.batch_size, cfg.model, cfg.name) == (2e-3, 4, "tiny", "child")
    (configs / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="relative to the file that names it"):
        load_config(str(configs / "orphan.yaml"))


# ------------------------------------------------------------------------ 19: progress in logs
def test_progress_is_plain_lines_without_a_terminal(pretrained, class_tree, tmp_path, capsys):
    """Item 19: no terminal (a SLURM log): training prints a line every log_every steps with the
    rate and the ETA, no carriage returns; feature extraction and probes report progress too (on
    stderr, as a bar would: stdout keeps the results)."""
    args = smoke_args(class_tree / "train", tmp_path / "run", "--max-steps", "4", "log_every=2")
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    lines = [x for x in out.splitlines() if x.startswith("[tokenmorph] step ")]
    assert [x.split()[2] for x in lines] == ["2/4", "4/4"]
    assert all(" img/s " in x and " ETA " in x and " loss " in x for x in lines)
    assert "\r" not in out + err
    status, out, err = run_main(
        capsys, "eval", "linear", "--checkpoint", pretrained, "--train", class_tree / "train",
        "--val", class_tree / "val", "--num-workers", "0", "--epochs", "5", "--lrs", "0.1",
    )  # fmt: skip
    assert status == 0, err
    for phase in ("train features: 24/24 img (100%)", "val features: 12/12 img (100%)",
                  "linear probe (1 lrs): 5/5 epoch (100%)"):  # fmt: skip
        assert any(x.startswith(f"[tokenmorph] {phase}") for x in err.splitlines()), err
    assert (
        "\r" not in out + err and json.loads(out.strip().splitlines()[-1])["protocol"] == "linear"
    )
