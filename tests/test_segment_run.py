"""Segmentation end to end: `tokenmorph segment` on a tiny ADE20K-layout folder, exact resume,
bad pairs, the backbones (checkpoint, export, timm), the seg-linear probe, compare --seeds, the
benchmark, and a short fine-tune on the Fashion-MNIST proxy set that beats chance."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmorph.models import student_from_checkpoint
from tokenmorph.recipes.config import load_config
from tokenmorph.recipes.segment import segmentation_backbone
from tokenmorph.runtime.checkpoints import latest_checkpoint, load_checkpoint

from .helpers import final_weights, read_metrics, run_cli, smoke_args

# A short tiny-scale version of the ADE20K protocol: every override shrinks a size, none
# changes the recipe (pipeline, heads, schedule, layer decay, metrics).
TINY = [
    "crop_size=32",
    "scale_long=128",
    "scale_short=32",
    "eval_stride=21",
    "batch_size=2",
    "head_channels=16",
    "aux_channels=16",
    "out_indices=auto",
    "warmup_steps=1",
    "num_workers=0",
    "log_every=1",
    "tensorboard=false",
]


@pytest.fixture(scope="module")
def smoke_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    run_cli(
        *smoke_args(photo_dir, out),
        "--max-steps",
        "2",
    )
    return out


def photo_pairs(split_images, split_masks, count, seed, prefix, ade=True):
    """``count`` photo crops with masks of blocks of labels (0..150 for ADE20K, 0 included)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    split_images.mkdir(parents=True, exist_ok=True)
    split_masks.mkdir(parents=True, exist_ok=True)
    photo = skimage.data.astronaut()
    for i in range(count):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 80))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        stem = f"{prefix}_{i + 1:08d}"
        Image.fromarray(photo[y : y + h, x : x + w]).save(split_images / f"{stem}.jpg")
        labels = rng.integers(0, 151 if ade else 3, size=(4, 4)).astype(np.uint8)
        mask = np.kron(labels, np.ones((h // 4 + 1, w // 4 + 1), np.uint8))[:h, :w]
        Image.fromarray(mask).save(split_masks / f"{stem}.png")


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    """A tiny ADEChallengeData2016 tree (6 training, 2 validation pairs), as the release lays it
    out."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    for split, count in (("training", 6), ("validation", 2)):
        prefix = "ADE_train" if split == "training" else "ADE_val"
        photo_pairs(
            root / "images" / split, root / "annotations" / split, count, len(split), prefix
        )
    return root.parent


def segment(smoke_run, data, out, *extra, check=True):
    return run_cli(
        "segment",
        "--config",
        "vit-b16-ade20k",
        "--checkpoint",
        smoke_run,
        "--data",
        data,
        "--output-dir",
        out,
        *TINY,
        *extra,
        check=check,
    )


def test_segment_on_an_ade20k_folder_and_exact_resume(smoke_run, ade_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    proc = segment(smoke_run, ade_root, a, "--max-steps", "4")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["classes"] == 150 and summary["val_images"] == 2
    assert 0 <= summary["mIoU"] <= 1 and 0 <= summary["aAcc"] <= 1
    assert "blocks [0, 0, 0, 1]" in proc.stdout and "lr 0.0004 (poly)" in proc.stdout
    table = (a / "per_class.md").read_text().splitlines()
    assert table[2].startswith("| wall |") and len(table) == 2 + 150 + 1
    record = json.loads((a / "segmentation_metrics.json").read_text())
    assert len(record["per_class"]) == 150 and record["eval_mode"] == "slide"
    ckpt = load_checkpoint(latest_checkpoint(a))
    assert ckpt["kind"] == "segment" and ckpt["segmentor"]["out_indices"] == [0, 0, 0, 1]
    assert ckpt["config"]["lr_schedule"] == "poly"
    logged = read_metrics(a)
    assert {"loss_decode", "loss_aux"} <= set(logged[0]) and logged[0]["lr"] < 1e-3
    # interrupted after 2 steps, resumed: the same losses and the same weights
    segment(smoke_run, ade_root, b, "--max-steps", "4", "stop_after=2")
    segment(smoke_run, ade_root, b, "--max-steps", "4")
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]
    wa, wb = final_weights(a)["model"], final_weights(b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_pairs_of_own_data_are_counted_or_stop_the_run(smoke_run, tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    photo_pairs(train / "images", train / "masks", 6, 1, "train", ade=False)
    photo_pairs(val / "images", val / "masks", 2, 2, "val", ade=False)
    (train / "classes.txt").write_text("sky\nground\nthing\n")
    Image.new("RGB", (8, 8)).save(train / "images" / "orphan.jpg")  # no mask
    (train / "masks" / "train_00000001.png").write_bytes(b"broken")  # undecodable mask
    out = tmp_path / "run"
    proc = segment(smoke_run, train, out, "--val-data", val, "--max-steps", "3")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images_without_mask"] == 1 and summary["classes"] == 3
    assert summary["skipped_images"] == 1  # 3 steps of 2 = one epoch: the broken mask once
    assert "(1 images without a mask skipped)" in proc.stdout
    assert "| thing |" in (out / "per_class.md").read_text()
    proc = segment(
        smoke_run, train, tmp_path / "strict", "--val-data", val, "on_bad_image=raise", check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "orphan.jpg has no mask" in proc.stderr
    proc = segment(smoke_run, train, tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--val-data" in proc.stderr


def test_backbones_from_a_checkpoint_an_export_and_timm(smoke_run, tmp_path):
    student = student_from_checkpoint(load_checkpoint(latest_checkpoint(smoke_run))).eval()
    vit, info = segmentation_backbone(str(smoke_run), 32)
    shared = student.encoder.rel_pos_bias.relative_position_bias_table
    own = [b.attn.relative_position_bias_table for b in student.encoder.blocks]
    # rel_pos_init=own_plus_shared (fine-tuning's default): each block's own table + the shared one
    assert all(
        torch.equal(b.attn.relative_position_bias_table, o + shared)
        for b, o in zip(vit.blocks, own)
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # at the pre-training size the backbone is the student's encoder
        assert torch.allclose(
            vit.eval().forward_features(x), student.encoder.forward_features(x), atol=1e-5
        )
    assert info["mean"] == pytest.approx(student.mean.flatten().tolist())
    # at the crop's size each block's table is resampled (the release's cubic rule)
    big, _ = segmentation_backbone(str(smoke_run), 64)
    assert big.blocks[0].attn.relative_position_bias_table.shape == ((2 * 16 - 1) ** 2 + 3, 3)
    cls_rows = (own[0] + shared)[-3:]  # the CLS rows are kept as they are
    assert torch.equal(big.blocks[0].attn.relative_position_bias_table[-3:], cls_rows)
    linear, _ = segmentation_backbone(str(smoke_run), 64, rel_pos_resize="timm")
    assert not torch.allclose(
        linear.blocks[0].attn.relative_position_bias_table,
        big.blocks[0].attn.relative_position_bias_table,
    )
    # an export of the same checkpoint gives the same backbone
    run_cli("export", smoke_run, tmp_path / "enc.safetensors")
    for spec in (tmp_path / "enc.json", tmp_path / "enc.safetensors"):
        exported, info = segmentation_backbone(str(spec), 64)
        assert info["source"].endswith("enc.json")
        theirs, ours = exported.state_dict(), big.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    vit, info = segmentation_backbone("timm:vit_tiny_patch16_224", 64, random_init=True)
    assert vit.pos_embed.shape == (1, 1 + 16, 192) and info["timm_model"] == "vit_tiny_patch16_224"


def test_mae_backbone_resamples_its_position_embedding(mae_run):
    vit, info = segmentation_backbone(str(mae_run), 64)
    assert type(vit).__name__ == "VisionTransformer" and vit.pos_embed.shape == (1, 1 + 256, 192)
    assert vit.pos_embed.requires_grad


def test_seg_linear_probe_program(smoke_run, tmp_path):
    proc = run_cli(
        "eval", "seg-linear", "--checkpoint", smoke_run, "--steps", "3", "--warmup-steps", "1",
        "--batch-size", "4", "--limit-val", "8", "--eval-batch-size", "8", "--crop-size", "32",
        "--num-workers", "0", "--no-progress", "--out-dir", tmp_path / "probe", "--layers", "last4",
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["protocol"] == "seg-linear" and len(result["classes"]) == 11
    assert result["blocks"] == [0, 1] and result["val_images"] == 8 and result["steps"] == 3
    assert (
        0 <= result["mIoU"] <= 1
        and "| background |" in (tmp_path / "probe" / "per_class.md").read_text()
    )
    proc = run_cli("eval", "seg-linear", "--checkpoint", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no checkpoint found" in proc.stderr


def test_seed_summary_mean_spread_and_paired_differences(tmp_path):
    from tokenmorph.eval.compare import seed_run_dir, seed_summary, seeds_markdown, t_critical

    assert seed_run_dir(tmp_path, "demo", 0, 0) == tmp_path / "demo"  # the one-seed layout
    assert seed_run_dir(tmp_path, "demo", 2, 0) == tmp_path / "demo" / "seed-2"
    a = [0.60, 0.62, 0.61]
    b = [0.63, 0.66, 0.64]  # better on every seed by 0.03, 0.04, 0.03
    rows = [
        {"config": c, "seed": s, "knn_top1": v[s], "linear_top1": 0.5, "heldout_token_loss": None}
        for c, v in (("A", a), ("B", b))
        for s in range(3)
    ]
    stats = seed_summary(rows)
    assert stats["reference"] == "A" and [c["config"] for c in stats["configs"]] == ["A", "B"]
    knn = stats["configs"][1]["metrics"]["knn_top1"]
    assert knn["mean"] == pytest.approx(np.mean(b)) and knn["sd"] == pytest.approx(
        np.std(b, ddof=1)
    )
    d = np.array(b) - np.array(a)
    paired = stats["configs"][1]["paired"]["knn_top1"]
    half = 4.303 * np.std(d, ddof=1) / np.sqrt(3)
    assert paired["mean"] == pytest.approx(d.mean())
    assert paired["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert paired["significant"] and not stats["configs"][1]["paired"]["linear_top1"]["significant"]
    assert "heldout_token_loss" not in stats["configs"][0]["metrics"]  # n/a for these runs
    text = seeds_markdown(stats)
    assert "| B | 3 | 64.33 ± 1.53 |" in text and "+3.33 [" in text and "] *" in text
    assert t_critical(2) == 4.303 and t_critical(11) == 2.228 and t_critical(100) == 1.96


@pytest.mark.slow
def test_compare_with_seeds(photo_dir, class_tree, tmp_path):
    tokenwise = tmp_path / "smoke-tokenwise.yaml"
    tokenwise.write_text("base: smoke\nscheduler: none\n")
    out = tmp_path / "cmp"
    args = [
        "compare", "--configs", "smoke", tokenwise, "--output-dir", out, "--data", photo_dir,
        "--eval-train", class_tree / "train", "--eval-val", class_tree / "val", "max_steps=1",
        "--probe-epochs", "2", "--loss-images", "4", "--seeds", "2", "--seg-linear",
        "--seg-steps", "2", "--seg-limit-val", "4",
    ]  # fmt: skip
    result = json.loads(run_cli(*args).stdout.strip().splitlines()[-1])
    runs = {(r["config"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {("smoke", 0), ("smoke", 1), ("smoke-tokenwise", 0), ("smoke-tokenwise", 1)}
    assert runs[("smoke", 0)]["run_dir"] == str(out / "smoke")
    assert runs[("smoke", 1)]["run_dir"] == str(out / "smoke" / "seed-1")
    assert all(0 <= r["seg_linear_miou"] <= 1 for r in runs.values())
    stats = json.loads((out / "compare_seeds.json").read_text())
    assert stats["reference"] == "smoke"
    tw = stats["configs"][1]
    knn = [runs[("smoke-tokenwise", s)]["knn_top1"] for s in (0, 1)]
    assert tw["metrics"]["knn_top1"]["mean"] == pytest.approx(sum(knn) / 2)
    diffs = [
        runs[("smoke-tokenwise", s)]["knn_top1"] - runs[("smoke", s)]["knn_top1"] for s in (0, 1)
    ]
    assert tw["paired"]["knn_top1"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert set(tw["paired"]) >= {"knn_top1", "linear_top1", "seg_linear_miou"}
    text = (out / "compare.md").read_text()
    assert "paired difference to smoke" in text and "seg-linear mIoU" in text


@pytest.mark.slow
def test_short_proxy_finetune_beats_chance(photo_dir, tmp_path):
    """A short UperNet fine-tune on the Fashion-MNIST proxy set, from a (barely pre-trained)
    2-block smoke student with 8 px patches at 64 px, reaches an mIoU well above predicting
    the most frequent class (background) everywhere."""
    pre = tmp_path / "pre"
    run_cli(
        "pretrain", "--config", "smoke", "img_size=64", "patch_size=8", "--data", photo_dir,
        "--output-dir", pre, "--max-steps", "2",
    )  # fmt: skip
    out = tmp_path / "proxy"
    proc = run_cli(
        "segment", "--config", "fashion-mnist-seg-tiny", "--checkpoint", pre, "--output-dir", out,
        *PROXY_FAST,
    )  # fmt: skip
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    record = json.loads((out / "segmentation_metrics.json").read_text())
    background = record["per_class"]["background"]
    # all background: IoU = the background's share of the labelled pixels, every other class 0
    chance = background["pixels"] / sum(c["pixels"] for c in record["per_class"].values()) / 11
    assert summary["mIoU"] > 1.5 * chance and summary["mIoU"] > chance + 0.03, (summary, chance)


# the proxy fine-tune at test scale: the canvases whole at 64 px (the 8 x 8 grid of the student),
# no photometric distortion, no auxiliary head, 150 steps of 16
PROXY_FAST = [
    "crop_size=64", "scale_short=64", "scale_long=256", "ratio_min=1", "ratio_max=1",
    "eval_stride=64", "photometric=false", "max_steps=150", "batch_size=16", "lr=1e-3",
    "layer_decay=1.0", "warmup_steps=10", "head_channels=32", "aux_weight=0", "limit_val=200",
    "eval_batch_size=50", "num_workers=0", "tensorboard=false", "save_every=1000",
]  # fmt: skip


def test_bench_segment_json_small():
    proc = run_cli(
        "bench", "segment", "--model", "tiny", "--img-size", "32", "--patch-size", "8",
        "--steps", "1", "--num-classes", "5", "--json",
    )  # fmt: skip
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(r["phases_s"]) == {"backbone", "neck", "heads", "loss", "backward", "optimizer"}
    assert r["images_per_second"] > 0 and r["batch_size"] == 2 and r["img_size"] == 32
    assert "--device cuda" in run_cli("bench", "segment", "--help").stdout


def test_segment_configs_say_where_values_come_from():
    b = load_config("vit-b16-ade20k", kind="segment")
    assert (b.lr, b.layer_decay, b.drop_path, b.beta2, b.weight_decay) == (
        4e-4,
        0.65,
        0.1,
        0.999,
        0.05,
    )
    assert (b.max_steps, b.batch_size, b.warmup_steps, b.lr_schedule, b.poly_power) == (
        160000, 16, 1500, "poly", 1.0,
    )  # fmt: skip
    assert (b.crop_size, b.scale_long, b.scale_short, b.eval_stride) == (512, 2048, 512, 341)
    v2 = load_config("vit-b16-ade20k-beitv2", kind="segment")
    assert (v2.lr, v2.layer_decay, v2.drop_path) == (5e-5, 0.75, 0.15)
    v1 = load_config("vit-b16-ade20k-beit", kind="segment")
    assert (v1.lr, v1.layer_decay, v1.drop_path) == (7e-4, 0.65, 0.1)
    large = load_config("vit-l16-ade20k", kind="segment")
    assert (large.lr, large.layer_decay, large.drop_path, large.out_indices) == (
        4e-5,
        0.9,
        0.2,
        "7,11,15,23",
    )
    from tokenmorph.recipes.config import CONFIG_DIR, config_names

    for name in config_names("segment"):
        load_config(name, kind="segment")
        text = (CONFIG_DIR / "segment" / f"{name}.yaml").read_text()
        assert text.startswith("#")
    lines = (CONFIG_DIR / "segment" / "vit-b16-ade20k.yaml").read_text().splitlines()
    values = [ln for ln in lines if ln and not ln.startswith("#")]
    assert all("#" in ln for ln in values)  # every value says where it comes from


@pytest.mark.slow
def test_segment_under_torchrun(smoke_run, ade_root, tmp_path):
    """Two processes (gloo on the CPU): DDP finds a gradient for every parameter (the pruned
    ViT, the neck, both heads), the run finishes, evaluates and records its world size."""
    from tests.helpers import run_torchrun

    out = tmp_path / "ddp"
    args = [
        "segment", "--config", "vit-b16-ade20k", "--checkpoint", smoke_run, "--data", ade_root,
        "--output-dir", out, "--max-steps", "2", *TINY, "batch_size=4",
    ]  # fmt: skip
    proc = run_torchrun(*args, port=29533, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["val_images"] == 2
    assert final_weights(out)["world_size"] == 2
