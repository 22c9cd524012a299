"""WebDataset shards: ``tokenmorph data shards`` writes them in WebDataset's and timm's layout,
:class:`TarShards` reads them back exactly, and a run from shards is the run from the folder
they were made of (bit for bit, resume included)."""

import gzip
import json
import stat
import struct
import tarfile

import numpy as np
import pytest
import torch

from tokenmorph.data import FashionMNIST, ImageFiles, build_dataset, data_fingerprint, open_rgb
from tokenmorph.data.shards import TarShards, folder_samples, write_shards
from tokenmorph.errors import DataError

from .helpers import final_weights, read_metrics, run_main, smoke_args


def test_folder_shards_hold_the_files_in_webdataset_layout(class_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    status, stdout, err = run_main(
        capsys, "data", "shards", class_tree / "train", out, "--shard-size", "10", "--json"
    )
    assert status == 0, err
    folder = ImageFiles(class_tree / "train")
    info = json.loads((out / "_info.json").read_text())
    entry = info["splits"]["train"]
    assert json.loads(stdout)["train"] == entry and info["name"] == "shards"
    assert entry["num_samples"] == len(folder) == 24 and entry["shard_lengths"] == [10, 10, 4]
    assert entry["filenames"] == [f"shards-train-{i:06d}.tar" for i in range(3)]
    assert entry["classes"] == folder.classes
    # WebDataset's layout: KEY.png (the file's own bytes) then KEY.cls, keys without dots
    with tarfile.open(out / entry["filenames"][0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["00000000.png", "00000000.cls", "00000001.png", "00000001.cls"]
        assert tar.extractfile("00000000.png").read() == folder.files[0].read_bytes()
        assert tar.extractfile("00000000.cls").read() == str(folder.targets[0]).encode()
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in out.iterdir())
    shards = build_dataset(str(out))  # a shard folder is a data source by itself
    assert isinstance(shards, TarShards) and len(shards) == 24
    assert shards.targets == folder.targets and shards.classes == folder.classes
    for i in range(len(folder)):
        image, label = shards[i]
        assert label == folder.targets[i]
        assert np.array_equal(np.asarray(image), np.asarray(open_rgb(folder.files[i])))
    assert [shards.position(i) for i in (0, 9, 10, 23)] == [(0, 0), (0, 9), (1, 0), (2, 3)]
    # the sidecar indexes are what the tar headers say (shards of other tools are scanned)
    for s, path in enumerate(shards.shards):
        scanned = np.array(TarShards._scan(path))
        rows = np.flatnonzero(shards._shard == s)
        own = np.stack([shards._offset, shards._size, shards._member, np.array(shards.targets)], 1)
        assert np.array_equal(scanned, own[rows])
        path.with_name(path.name.replace(".tar", ".idx.npy")).unlink()
    rescanned = TarShards(out)
    assert rescanned.targets == shards.targets and np.array_equal(rescanned._offset, shards._offset)


def write_idx(path, array):
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_shards_are_its_two_splits_lossless(tmp_path, capsys):
    """A small Fashion-MNIST in its idx files -> train and validation splits, pixel-exact."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    out = tmp_path / "shards"
    status, _, err = run_main(capsys, "data", "shards", f"fashion-mnist:{root}", out)
    assert status == 0, err
    for train, split in ((True, "train"), (False, "validation")):
        ref = FashionMNIST(root, train=train)
        ds = build_dataset(str(out), train=train)
        assert ds.split == split and len(ds) == len(ref) and ds.targets == ref.targets.tolist()
        for i in range(len(ds)):
            grey = np.asarray(ds[i][0].convert("L"))
            assert np.array_equal(grey, ref.data[i].numpy())


def test_bad_samples_are_skipped_and_counted_or_raise(tmp_path, photo_dir):
    files = ImageFiles(photo_dir)
    samples = list(folder_samples(files))[:6]
    samples[2] = (b"not an image", "jpg", -1)
    samples[4] = (samples[4][0][:200], "png", -1)  # truncated
    write_shards(iter(samples), tmp_path / "s", "s", "train", 4)
    ds = TarShards(tmp_path / "s")
    assert [ds[i] is None for i in range(6)] == [False, False, True, False, True, False]
    strict = TarShards(tmp_path / "s", on_error="raise")
    with pytest.raises(DataError, match="s-train-000000.tar sample 2"):
        strict[2]
    with pytest.raises(DataError, match="no split 'validation'"):
        TarShards(tmp_path / "s", "validation")


def test_a_run_from_shards_is_the_run_from_the_folder_and_resumes_exactly(
    photo_dir, tmp_path, capsys
):
    """The shards of a folder train the folder's model bit for bit; stopped after 3 steps and
    resumed, the same again (every sample read once per its place in the order: no shard
    repeated or skipped)."""
    shards = tmp_path / "shards"
    assert run_main(capsys, "data", "shards", photo_dir, shards, "--shard-size", "8")[0] == 0
    runs = {k: tmp_path / k for k in ("folder", "shards", "resumed")}
    assert run_main(capsys, *smoke_args(photo_dir, runs["folder"], "--max-steps", "6"))[0] == 0
    assert run_main(capsys, *smoke_args(shards, runs["shards"], "--max-steps", "6"))[0] == 0
    args = smoke_args(shards, runs["resumed"], "--max-steps", "6")
    assert run_main(capsys, *args, "stop_after=3")[0] == 0
    status, out, _ = run_main(capsys, *args)
    assert status == 0 and "resuming from" in out
    weights = {k: final_weights(v)["model"] for k, v in runs.items()}
    for k in ("shards", "resumed"):
        assert all(torch.equal(weights["folder"][n], weights[k][n]) for n in weights[k]), k
    losses = {k: [r["loss"] for r in read_metrics(v)] for k, v in runs.items()}
    assert losses["folder"] == losses["shards"] == losses["resumed"] and len(losses["folder"]) == 6
    # the run records the shards' fingerprint: rewritten shards are a changed data set
    fp = final_weights(runs["resumed"])["data_fingerprint"]
    assert fp == data_fingerprint(TarShards(shards)) and fp["kind"] == "shards train"


def test_bench_data_reports_every_source(capsys):
    args = ("bench", "data", "--images", "32", "--crops", "16", "--workers", "0,1")
    status, out, err = run_main(
        capsys, *args, "--batch-size", "8", "--shard-size", "8", "--decode-device", "cpu", "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    rows = {(r["source"], r["decode"], r["workers"]): r["images_per_s"] for r in result["results"]}
    on_cpu = {(s, "cpu", w) for s in ("jpeg_folder", "tar_shards", "memory") for w in (0, 1)}
    on_device = {(s, "device:cpu", w) for s in ("jpeg_folder", "tar_shards") for w in (0, 1)}
    assert set(rows) == on_cpu | on_device
    assert all(v > 0 for v in rows.values()) and result["machine"]["cpus"] >= 1


def test_evaluation_reads_shards_as_it_reads_the_folders(
    class_tree, smoke_eval_run, tmp_path, capsys
):
    """k-NN on the shards of the train and val trees (one shard folder, two splits, as
    --dataset; and as --train/--val) gives the result of the trees themselves."""
    shards = tmp_path / "shards"
    for split, folder in (("train", "train"), ("validation", "val")):
        args = (
            "data",
            "shards",
            class_tree / folder,
            shards,
            "--split",
            split,
            "--shard-size",
            "5",
        )
        assert run_main(capsys, *args)[0] == 0
    common = ("eval", "knn", "--checkpoint", smoke_eval_run, "--num-workers", "0")
    results = []
    for data in (
        ("--train", class_tree / "train", "--val", class_tree / "val"),
        ("--dataset", shards),
        ("--train", shards, "--val", shards),
    ):
        status, out, err = run_main(capsys, *common, *data)
        assert status == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        results.append({k: result[k] for k in ("top1", "top5", "num_train", "num_val", "per_k")})
    assert results[0] == results[1] == results[2] and results[0]["num_val"] == 12
    # fine-tuning's data: the shard folder's two splits, labelled
    from tokenmorph.recipes.config import FinetuneConfig
    from tokenmorph.recipes.finetune import build_datasets

    train, val, classes = build_datasets(
        FinetuneConfig(data=str(shards)), 32, (0.5,) * 3, (0.5,) * 3
    )
    assert (len(train), len(val), classes) == (24, 12, ["astronaut", "coffee", "rocket"])
    unlabelled = tmp_path / "unlabelled"
    assert (
        run_main(capsys, "data", "shards", class_tree / "train", unlabelled, "--labels", "none")[0]
        == 0
    )
    with pytest.raises(DataError, match="unlabelled samples"):
        build_datasets(FinetuneConfig(data=str(unlabelled)), 32, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def smoke_eval_run(tmp_path_factory):
    """A pre-training checkpoint of the smoke geometry to evaluate (no training needed)."""
    from .test_export import SMOKE_ARCH, write_checkpoint

    run = tmp_path_factory.mktemp("eval") / "run"
    write_checkpoint(run / "checkpoints" / "step_00000003.pt", **SMOKE_ARCH)
    return run
