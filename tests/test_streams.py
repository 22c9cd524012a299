"""Streamed and Hugging Face data sources: ``data=wds:`` reads WebDataset shards as a stream
whose position (the samples each rank consumed) is saved in the checkpoint, so a stopped or
killed run resumes without repeating or skipping a sample; ``data=hfds:`` reads a local Hugging
Face data set by index."""

import io
import json
import os
import shutil
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tokenmorph.data import FashionMNIST, ImageFiles, build_dataset, eval_transform
from tokenmorph.data.shards import folder_samples, write_shards
from tokenmorph.data.stream import ShardStream
from tokenmorph.errors import CheckpointError
from tokenmorph.runtime.sampling import KeyedStream, collate_keyed

from .helpers import (
    final_weights,
    last_json,
    run_cli,
    run_main,
    run_torchrun,
    sigterm_after,
    smoke_args,
)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def shards(photo_dir, tmp_path_factory):
    """``tokenmorph data shards`` of the 40 photos: 5 shards of 8."""
    out = tmp_path_factory.mktemp("wds") / "shards"
    from tokenmorph.cli import main

    assert main(["data", "shards", str(photo_dir), str(out), "--shard-size", "8"]) == 0
    return out


def record_loads(monkeypatch):
    """Every (shard name, place) the stream loads, in order (num_workers=0: in this process)."""
    keys = []
    load = ShardStream.load

    def recording(self, shard, place):
        keys.append((self.shards[shard].name, place))
        return load(self, shard, place)

    monkeypatch.setattr(ShardStream, "load", recording)
    return keys


def test_a_stopped_wds_run_resumes_without_repeating_or_skipping(
    shards, tmp_path, capsys, monkeypatch
):
    """(a) 6 steps of 8 from 5 shards of 8: stopped after 3 steps and resumed, the samples
    read across both halves are the uninterrupted run's, in the same order, and so are the
    final weights; the first 40 samples are every shard once, each read front to back; the
    checkpoint's position says which shards are finished and the offset into the next."""
    keys = record_loads(monkeypatch)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(capsys, *smoke_args(f"wds:{shards}", whole, "--max-steps", "6"))[0] == 0
    uninterrupted = list(keys)
    keys.clear()
    args = smoke_args(f"wds:{shards}", parts, "--max-steps", "6", "save_every=100")
    assert run_main(capsys, *args, "stop_after=3")[0] == 0
    first_half = list(keys)
    position = final_weights(parts)["data_position"]
    status, out, err = run_main(capsys, *args)
    assert status == 0 and "resuming from" in out, err
    assert len(uninterrupted) == 48 and first_half == uninterrupted[:24]
    assert keys == uninterrupted  # the resumed half read exactly samples 24..47
    # epoch 0: every shard once, whole, in order; then epoch 1 begins with another shard
    epoch0 = uninterrupted[:40]
    runs = [epoch0[i : i + 8] for i in range(0, 40, 8)]
    assert all(r == [(r[0][0], p) for p in range(8)] for r in runs)
    assert sorted(r[0][0] for r in runs) == sorted(p.name for p in shards.glob("*.tar"))
    # after 3 steps (24 samples): 3 shards finished, the 4th not started
    (rank0,) = position["ranks"]
    assert position["consumed"] == 24 and position["processes"] == 1
    assert rank0["finished"] == [r[0][0] for r in runs[:3]]
    assert rank0["shard"] == runs[3][0][0] and rank0["offset"] == 0 and rank0["epoch"] == 0
    weights = [final_weights(d)["model"] for d in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_stream_positions_offsets_workers_and_bad_samples(photo_dir, tmp_path):
    """(b) a bad sample in a streamed shard is skipped and counted (``on_error=raise``: one line
    naming it); the micro-batches are the same for 0 and 2 workers; a position in the middle of
    a shard resumes at its offset; a stream read by 2 processes splits the shards."""
    samples = list(folder_samples(ImageFiles(photo_dir)))[:20]
    samples[5] = (b"not an image", "jpg", -1)
    samples[13] = (samples[13][0][:100], "png", -1)  # truncated
    write_shards(iter(samples), tmp_path / "s", "s", "train", 5)
    stream = ShardStream(str(tmp_path / "s"), transform=eval_transform(32, 1.0))
    assert len(stream) == 20 and stream.lengths == [5] * 4

    def batches(workers, start=0, n=8, rank=0, world=1):
        keyed = KeyedStream(stream, seed=0).span(rank, world, 2, 1, start, n)
        loader = DataLoader(keyed, batch_size=None, num_workers=workers, collate_fn=collate_keyed)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert [b["skipped"] for b in serial] == [b["skipped"] for b in parallel]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(serial, parallel))
    order = list(islice(stream.items(0, 0, 1), 16))  # the stream is endless
    bad = [i for i, (_, index, _, _) in enumerate(order[:16]) if index in (5, 13)]
    assert sum(b["skipped"] for b in serial) == len(bad) == 2
    assert all(b["positions"] == [0, 1] for b in serial if not b["skipped"])
    # a position mid-shard: the items from sample 7 on are the tail of the whole stream
    assert list(zip(range(9), stream.items(0, 0, 1, 7))) == list(enumerate(order[7:16]))
    pos = stream.position(0, 0, 1, 7)
    assert pos["finished"] == [stream.shards[order[0][2]].name] and pos["offset"] == 2
    tail = batches(0, start=6, n=5)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(serial[3:], tail))
    # two processes: disjoint shards, together all of them
    halves = [{s for _, _, s, _ in islice(stream.items(0, r, 2), 10)} for r in (0, 1)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == {0, 1, 2, 3}
    # shards of another tool (no _info.json, no sidecar index): a folder, a glob, a brace pattern
    (tmp_path / "other").mkdir()
    for p in stream.shards:
        shutil.copy(p, tmp_path / "other" / p.name)
    specs = [tmp_path / "other", tmp_path / "other" / "*.tar"]
    specs.append(tmp_path / "other" / "s-train-{000000..000003}.tar")
    for spec in specs:
        other = ShardStream(str(spec))
        assert [p.name for p in other.shards] == [p.name for p in stream.shards]
        assert other.lengths == stream.lengths and other.fingerprint() == stream.fingerprint()
        assert all(other.label(s, p) == stream.label(s, p) for _, _, s, p in order)
    strict = ShardStream(str(tmp_path / "s"), on_error="raise")
    failed = KeyedStream(strict, 0).span(0, 1, 20, 1, 0, 1)
    assert "error" in collate_keyed(next(iter(failed)))
    with pytest.raises(CheckpointError, match="read by 1 processes, this run has 2"):
        KeyedStream(stream, 0).load_state_dict(KeyedStream(stream, 0).state_dict(8, 1), 2, "x")


def test_a_changed_shard_set_is_refused_on_resume(shards, tmp_path, capsys):
    """(d) shards rewritten (other sizes) between a stop and the resume: one line, even with
    --apply-changes, and the run folder keeps its checkpoint."""
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    run = tmp_path / "run"
    args = smoke_args(f"wds:{data}", run, "--max-steps", "4")
    assert run_main(capsys, *args, "stop_after=2")[0] == 0
    write_shards(((_png(i), "png", -1) for i in range(24)), data, "shards", "train", 6)
    for extra in ((), ("--apply-changes",)):
        status, _, err = run_main(capsys, *args, *extra)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and "the data of the stream data=wds:" in lines[0], (
            err
        )
        assert "changed" in lines[0] and "cannot resume" in lines[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002.pt"]


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat"] + [f"c{i}" for i in range(5, 10)]


@pytest.fixture(scope="module")
def fm_hf(tmp_path_factory):
    """Real Fashion-MNIST images (48 train, 32 test, PNG) in a save_to_disk DatasetDict with a
    ClassLabel column; train row 3 does not decode."""
    if not os.path.isdir(FASHION_MNIST):
        pytest.skip("no Fashion-MNIST")
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    )
    splits = {}
    for split, train, n in (("train", True, 48), ("test", False, 32)):
        fm = FashionMNIST(FASHION_MNIST, train=train)
        rows = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(fm.data[i].numpy()).save(buf, format="PNG")
            rows.append({"bytes": buf.getvalue(), "path": None})
        if train:
            rows[3] = {"bytes": b"not an image", "path": None}
        labels = fm.targets[:n].tolist()
        splits[split] = datasets.Dataset.from_dict(
            {"image": rows, "label": labels}, features=features
        )
    folder = tmp_path_factory.mktemp("hf") / "fm-hf"
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def test_hfds_trains_and_evaluates_fashion_mnist(fm_hf, tmp_path, capsys):
    """(c) hfds: a save_to_disk folder of Fashion-MNIST: a smoke pre-training reads it (the bad
    row skipped and counted) and k-NN evaluates the checkpoint on its two splits."""
    folder, names = fm_hf, NAMES
    ds = build_dataset(f"hfds:{folder}")
    assert len(ds) == 48 and ds.classes == names and ds[3] is None
    ref = FashionMNIST(FASHION_MNIST, train=True)
    assert np.array_equal(np.asarray(ds[0][0].convert("L")), ref.data[0].numpy())
    assert ds[0][1] == int(ref.targets[0])
    run = tmp_path / "run"
    args = smoke_args(f"hfds:{folder}", run, "--max-steps", "6")
    status, out, err = run_main(capsys, *args)
    assert status == 0, err
    summary = last_json(out)
    assert summary["finished"] and summary["skipped_images"] == 1  # 48 samples: each once
    ckpt = run / "checkpoints" / "step_00000006.pt"
    status, out, err = run_main(
        capsys, "eval", "knn", "--checkpoint", ckpt, "--dataset", f"hfds:{folder}",
        "--num-workers", "0", "--k", "5",
    )  # fmt: skip
    assert status == 0, err
    result = last_json(out)
    assert result["skipped_images"] == 1 and 0.0 <= result["top1"] <= 100.0


@pytest.mark.slow
def test_a_wds_run_killed_by_sigterm_resumes_with_the_uninterrupted_weights(shards, tmp_path):
    """(a) through the CLI: SIGTERM to the process group of a run with 2 loader workers ends
    the step with a checkpoint; the rerun (0 workers: the batches do not depend on them) ends
    with the weights of an uninterrupted run."""
    cmd = [sys.executable, "-m", "tokenmorph", *map(str, smoke_args(f"wds:{shards}", ""))]
    cmd = cmd[:-1]  # the output folder comes last
    base = ["--max-steps", "40", "save_every=1000"]
    whole = tmp_path / "whole"
    done = subprocess.run(cmd + [str(whole), *base], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "killed"
    returncode, err = sigterm_after(cmd + [str(run), *base, "num_workers=2"], run, lines=7)
    assert returncode == 2 and "stopped by signal" in err, err[-2000:]
    step = final_weights(run)["step"]
    assert 7 <= step < 40
    position = final_weights(run)["data_position"]
    assert position["consumed"] == 8 * step
    resumed = subprocess.run(cmd + [str(run), *base], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stdout, resumed.stderr[-2000:]
    weights = [final_weights(d)["model"] for d in (whole, run)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


@pytest.mark.slow
def test_two_processes_stop_and_resume_a_wds_stream(shards, tmp_path):
    """torchrun with 2 processes: each reads its own shards (the checkpoint's positions name
    disjoint ones); stopped after 3 steps and resumed (another worker count), the weights are
    the uninterrupted 2-process run's; resuming with 1 process is refused with one line."""

    def torchrun(out, *extra, port):
        args = smoke_args(f"wds:{shards}", out, "--max-steps", "6", *extra)
        done = run_torchrun(*args, port=port, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(whole, port=29531)
    torchrun(parts, "stop_after=3", port=29532)
    position = final_weights(parts)["data_position"]
    assert position["processes"] == 2 and position["consumed"] == 12
    ranks = position["ranks"]
    read = [set(r["finished"]) | ({r["shard"]} if r["offset"] else set()) for r in ranks]
    assert read[0] and read[1] and not read[0] & read[1]
    one = run_cli(*smoke_args(f"wds:{shards}", parts, "--max-steps", "6"), check=False)
    lines = one.stderr.strip().splitlines()
    assert one.returncode == 2 and len(lines) == 1 and "read by 2 processes" in lines[0]
    torchrun(parts, "num_workers=1", port=29533)
    weights = [final_weights(d)["model"] for d in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_hfids_streams_and_resumes_exactly(fm_hf, tmp_path, capsys, monkeypatch):
    """hfids: the same data set as a datasets.IterableDataset: stopped after 3 steps and
    resumed, the rows read across both halves are the uninterrupted run's (the first 48: each
    row once) and so are the weights."""
    from tokenmorph.data.hf import HFStream

    seen = []
    load = HFStream.load

    def recording(self, cell, label):
        seen.append(cell["bytes"])
        return load(self, cell, label)

    monkeypatch.setattr(HFStream, "load", recording)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_main(capsys, *smoke_args(f"hfids:{fm_hf}", whole, "--max-steps", "7"))[0] == 0
    uninterrupted = list(seen)
    seen.clear()
    args = smoke_args(f"hfids:{fm_hf}", parts, "--max-steps", "7")
    assert run_main(capsys, *args, "stop_after=3")[0] == 0
    status, out, err = run_main(capsys, *args)
    assert status == 0 and "resuming from" in out, err
    assert seen == uninterrupted and len(seen) == 56
    assert len(set(seen[:48])) == 48  # epoch 0: every row once (then epoch 1)
    assert final_weights(parts)["data_position"]["consumed"] == 56
    weights = [final_weights(d)["model"] for d in (whole, parts)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
