"""Semantic segmentation pieces: mmseg's metrics, sliding-window inference, the neck and heads,
the release's bias-table resampling, BEiT's layer decay and poly schedule, the data pipeline and
the Fashion-MNIST proxy set."""

import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmorph.data import collate_skip
from tokenmorph.data.segmentation import (
    ADE20K_CLASSES,
    FashionMNISTCanvases,
    SegEvalTransform,
    SegTrainTransform,
    generic_dataset,
    hsv_to_rgb,
    photometric_distortion,
    random_crop,
    reduce_zero_label,
    rescale_size,
    rgb_to_hsv,
)
from tokenmorph.errors import DataError
from tokenmorph.models.segmentation import (
    LinearSegmentor,
    MultiScaleNeck,
    UperNetSegmentor,
    ViTFeatures,
    _geometric_offsets,
    default_out_indices,
    resize_rel_pos_table,
)
from tokenmorph.ops.segmentation import (
    confusion_matrix,
    segmentation_loss,
    segmentation_metrics,
    slide_inference,
    slide_windows,
    whole_inference,
)
from tokenmorph.recipes.segment import segmentation_backbone
from tokenmorph.runtime.optim import layer_decay_param_groups, poly_lr


# ------------------------------------------------------------------------------------- metrics
def test_metrics_against_a_hand_computed_confusion_matrix():
    """4 classes: class 2 is predicted but absent from the ground truth (IoU 0 counted, Acc
    excluded), class 3 appears only on ignored pixels (absent: excluded from both means)."""
    pairs = [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 2 + [(1, 0), (1, 2)] + [(255, 3)] * 2 + [(255, 0)]
    gt = torch.tensor([g for g, _ in pairs]).view(1, 1, -1)
    pred = torch.tensor([p for _, p in pairs]).view(1, 1, -1)
    cm = confusion_matrix(pred, gt, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm)
    # IoU_0 = 3 / (4 + 4 - 3), IoU_1 = 2 / (4 + 3 - 2), IoU_2 = 0 / 1, IoU_3 = 0 / 0
    assert m["IoU"][:3] == [0.6, 0.4, 0.0] and math.isnan(m["IoU"][3])
    assert m["Acc"][:2] == [0.75, 0.5] and math.isnan(m["Acc"][2]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx(1 / 3) and m["mAcc"] == pytest.approx(0.625)
    assert m["aAcc"] == pytest.approx(5 / 8) and m["pixels"] == [4, 4, 0, 0]


def mmseg_reference(preds, gts, num_classes):
    """mmseg's formulation, written independently: per image the intersect / pred / label
    histograms of the non-ignored pixels, summed over the data set, then nanmeans."""
    inter, area_pred, area_label = (np.zeros(num_classes) for _ in range(3))
    for p, g in zip(preds, gts):
        keep = g != 255
        p, g = p[keep], g[keep]
        inter += np.bincount(p[p == g], minlength=num_classes)
        area_pred += np.bincount(p, minlength=num_classes)
        area_label += np.bincount(g, minlength=num_classes)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_label
    return np.nanmean(iou), np.nanmean(acc), inter.sum() / area_label.sum()


def test_metrics_equal_mmsegs_histograms_over_a_data_set():
    rng = np.random.default_rng(0)
    k = 7
    preds, gts = [], []
    cm = torch.zeros(k, k, dtype=torch.long)
    for _ in range(5):
        g = rng.integers(0, k - 2, size=(13, 17))  # classes 5 and 6 never in the ground truth
        g[rng.random(g.shape) < 0.2] = 255
        p = np.where(
            rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, k - 1, g.shape)
        )
        preds.append(p)
        gts.append(g)
        cm += confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), k)
    m = segmentation_metrics(cm)
    miou, macc, aacc = mmseg_reference(preds, gts, k)
    assert m["mIoU"] == pytest.approx(miou) and m["mAcc"] == pytest.approx(macc)
    assert m["aAcc"] == pytest.approx(aacc)
    assert math.isnan(m["IoU"][6]) and m["IoU"][5] == 0.0  # 5 predicted, 6 never


def test_loss_averages_over_every_pixel_ignored_ones_included():
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[0, :4] = 255
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    per_pixel = torch.nn.functional.cross_entropy(up, labels, ignore_index=255, reduction="none")
    assert torch.allclose(segmentation_loss(logits, labels), per_pixel.sum() / 128)
    assert not torch.allclose(segmentation_loss(logits, labels), per_pixel[labels != 255].mean())


# ----------------------------------------------------------------------------------- inference
def test_slide_windows_follow_mmsegs_rule():
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    wins = slide_windows(700, 1200, 512, 341)
    assert len(wins) == 2 * 4 and wins[-1] == (188, 700, 688, 1200)
    covered = np.zeros((700, 1200), bool)
    for y1, y2, x1, x2 in wins:
        assert (y2 - y1, x2 - x1) == (512, 512)
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert slide_windows(300, 400, 512, 341) == [(0, 300, 0, 400)]


def test_sliding_window_equals_whole_image_when_one_window_covers_it(tiny_segmentor):
    model = tiny_segmentor.eval()
    with torch.no_grad():
        for side in (32, 24):  # the crop itself; a smaller image (zero-padded to the crop)
            x = torch.randn(2, 3, side, side)
            slide = slide_inference(model, x, 32, 21)
            assert torch.equal(slide, whole_inference(model, x, 32))
            assert slide.shape == (2, 5, side, side)
    with pytest.raises(ValueError, match="use the sliding window"):
        whole_inference(model, torch.randn(1, 3, 40, 32), 32)


def test_sliding_window_averages_overlapping_logits():
    """A per-pixel model gives the same logits in every window: the average over overlapping
    windows must be the model applied to the whole image."""
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 50, 77)
    with torch.no_grad():
        assert torch.allclose(slide_inference(conv, x, 32, 21), conv(x), atol=1e-6)


# ---------------------------------------------------------------------------------- the models
@pytest.fixture(scope="module")
def tiny_segmentor():
    vit, _ = segmentation_backbone(None, 32, model_size="tiny", patch_size=8)
    vit.blocks = vit.blocks[:3]
    return UperNetSegmentor(ViTFeatures(vit, [0, 1, 1, 2]), 5, channels=16, aux_channels=8)


@pytest.mark.parametrize(
    "size,dim,depth,blocks",
    [
        ("small", 384, 12, [3, 5, 7, 11]),
        ("base", 768, 12, [3, 5, 7, 11]),
        ("large", 1024, 24, [7, 11, 15, 23]),
    ],
)
def test_neck_and_heads_shapes_at_512(size, dim, depth, blocks):
    """ViT-S/B/L at 512 x 512 (on the meta device: shapes without memory or compute)."""
    assert default_out_indices(depth) == blocks
    with torch.device("meta"):
        vit, _ = segmentation_backbone(None, 512, model_size=size)
        model = UperNetSegmentor(ViTFeatures(vit, blocks), 150)
        x = torch.empty(2, 3, 512, 512)
        feats = model.backbone(x)
        assert [tuple(f.shape) for f in feats] == [(2, dim, 32, 32)] * 4
        levels = model.neck(feats)
        assert [tuple(f.shape) for f in levels] == [(2, dim, s, s) for s in (128, 64, 32, 16)]
        assert model.decode_head(levels).shape == (2, 150, 128, 128)
        assert model.aux_head(levels[2]).shape == (2, 150, 32, 32)
    assert model.decode_head.fuse[0].in_channels == 4 * dim  # channels = the backbone's width
    assert model.aux_head.conv[0].out_channels == 256


def test_neck_gives_strides_4_to_32_for_every_patch_size():
    for patch, ops in ((16, "SCIM"), (8, "CIMM"), (4, "IMMM")):
        neck = MultiScaleNeck(8, patch)
        kinds = "".join(
            {"Sequential": "S", "ConvTranspose2d": "C", "Identity": "I", "MaxPool2d": "M"}[
                type(getattr(neck, f"fpn{i}")).__name__
            ]
            for i in range(1, 5)
        )
        assert kinds == ops
        grid = 64 // patch
        out = neck([torch.randn(1, 8, grid, grid)] * 4)
        assert [o.shape[-1] for o in out] == [16, 8, 4, 2]  # 64 px / strides 4, 8, 16, 32


def test_every_parameter_trains_and_the_losses_are_weighted(tiny_segmentor):
    model = tiny_segmentor.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    total, logs = model(x, y)
    assert torch.allclose(total, logs["loss_decode"] + 0.4 * logs["loss_aux"])
    model.zero_grad()
    total.backward()
    # DDP needs a gradient for every parameter: the pruned final norm and head are gone
    assert all(p.grad is not None for p in model.parameters())
    assert not any(n.startswith("backbone.vit.norm.") for n, _ in model.named_parameters())
    # one image (a skipped sample): the 1x1 pyramid level normalises with the running stats
    total, _ = model(x[:1], y[:1])
    assert torch.isfinite(total)


def test_linear_probe_keeps_the_backbone_frozen():
    vit, _ = segmentation_backbone(None, 32, model_size="tiny", patch_size=8)
    vit.blocks = vit.blocks[:4]
    probe = LinearSegmentor(ViTFeatures(vit, [0, 1, 2, 3], norm=True), 3)
    assert probe.bn.num_features == 4 * 192
    before = {k: v.clone() for k, v in probe.features.state_dict().items()}
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=0.1)
    probe.train()
    assert not probe.features.training
    loss, _ = probe(torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in probe.features.state_dict().items())
    assert probe(torch.randn(1, 3, 32, 32)).shape == (1, 3, 4, 4)


# ------------------------------------------------------------------------- bias-table resampling
def test_geometric_grid_of_224_to_512():
    offsets = _geometric_offsets(27, 63)
    q = offsets[15] - offsets[14]  # d_2 - d_1 = q
    assert len(offsets) == 27 and offsets[13] == 0.0 and offsets[14] == 1.0
    assert q == pytest.approx(1.134918, abs=1e-5) and offsets[-1] == pytest.approx(31.0, abs=1e-3)


def test_release_cubic_resize_reproduces_a_cubic_and_keeps_the_cls_rows():
    src = _geometric_offsets(27, 63)
    yy, xx = np.meshgrid(src, src, indexing="ij")

    def cubic(y, x):
        return 0.5 + 0.1 * y - 0.02 * x**2 + 0.001 * y * x**2 + 0.0005 * y**3

    heads = [cubic(yy, xx), -cubic(xx, yy)]
    table = torch.tensor(np.stack([h.reshape(-1) for h in heads], -1), dtype=torch.float32)
    table = torch.cat([table, torch.randn(3, 2)])
    out = resize_rel_pos_table(table, (32, 32), "release")
    assert out.shape == (63 * 63 + 3, 2) and torch.equal(out[-3:], table[-3:])
    t = np.arange(-31, 32, dtype=np.float64)
    ty, tx = np.meshgrid(t, t, indexing="ij")
    # a cubic spline interpolates a cubic polynomial exactly (an independent formulation)
    expect = np.stack([cubic(ty, tx).reshape(-1), -cubic(tx, ty).reshape(-1)], -1)
    assert np.allclose(out[:-3].numpy(), expect, atol=1e-3)
    linear = resize_rel_pos_table(table, (32, 32), "timm")
    assert linear.shape == out.shape and not torch.allclose(linear, out, atol=1e-3)
    assert torch.equal(resize_rel_pos_table(table, (14, 14)), table)


# ----------------------------------------------------------------------- optimiser and schedule
def test_layer_decay_groups_follow_beits_constructor(tiny_segmentor):
    model, depth, rate = tiny_segmentor, 3, 0.65

    def mmcv_layer(name):  # BEiT's get_num_layer_for_vit, on our names
        rel = name.removeprefix("backbone.vit.")
        if rel == name:
            return depth + 1
        if rel in ("cls_token", "mask_token", "pos_embed") or rel.startswith("patch_embed"):
            return 0
        if rel.startswith("blocks"):
            return int(rel.split(".")[1]) + 1
        return depth + 1

    groups = layer_decay_param_groups(model, 0.05, rate, depth, "backbone.vit.", "release")
    where = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = where[id(p)]
        assert g["lr_scale"] == pytest.approx(rate ** (depth + 1 - mmcv_layer(name)))
        decayed = not (p.ndim == 1 or name.endswith(".bias"))
        assert (g["weight_decay"] == 0.05) == decayed, name
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and all(where[id(model.get_parameter(n))]["weight_decay"] == 0.05 for n in tables)
    cls = model.backbone.vit.cls_token
    assert where[id(cls)]["weight_decay"] == 0.05  # the release decays the CLS token
    timm_rule = layer_decay_param_groups(model, 0.05, rate, depth, "backbone.vit.", "timm")
    assert {id(p): g["weight_decay"] for g in timm_rule for p in g["params"]}[id(cls)] == 0.0
    # timm's param_groups_layer_decay numbers the same layers (stem 0, block i = i + 1) but tops
    # out at the last block (the final norm shares it, an unmatched head takes it): every
    # backbone scale of BEiT's rule is timm's times one more factor of the rate
    from timm.optim import param_groups_layer_decay

    fresh, _ = segmentation_backbone(None, 32, model_size="tiny", patch_size=8)
    fresh.blocks = fresh.blocks[:depth]
    by_id = {
        id(p): g["lr_scale"]
        for g in param_groups_layer_decay(fresh, 0.05, layer_decay=rate)
        for p in g["params"]
    }
    ours = {
        n.removeprefix("backbone.vit."): where[id(p)]["lr_scale"]
        for n, p in model.named_parameters()
    }
    for name, p in fresh.named_parameters():
        if name.startswith(("blocks", "patch_embed", "cls_token")):
            assert ours[name] == pytest.approx(rate * by_id[id(p)]), name


def test_poly_schedule_is_mmcvs():
    base, total, warm = 4e-4, 1000, 150
    for step in (0, 1, 75, 149, 150, 151, 999):
        regular = base * (1 - step / total)
        if step < warm:
            expect = regular * (1 - (1 - step / warm) * (1 - 1e-6))
        else:
            expect = regular
        assert poly_lr(base, step, total, warm) == pytest.approx(expect, rel=1e-12)
    assert poly_lr(base, 0, total, warm) == pytest.approx(base * 1e-6)
    assert poly_lr(1.0, 500, 1000, 0, power=0.9, min_lr=0.1) == pytest.approx(0.9 * 0.5**0.9 + 0.1)


def test_poly_schedule_in_the_optimiser_step(tiny_segmentor):
    from tokenmorph.recipes.config import SegmentConfig
    from tokenmorph.runtime.optim import OptimizerStep

    cfg = SegmentConfig(lr=1e-3, warmup_steps=10, max_steps=100)
    groups = layer_decay_param_groups(tiny_segmentor, 0.05, 0.5, 3, "backbone.vit.")
    opt = OptimizerStep(cfg, tiny_segmentor, 100, 100, groups)
    for step in (0, 5, 10, 50):
        opt.begin(step)
        for g in opt.optimizer.param_groups:
            assert g["lr"] == pytest.approx(poly_lr(1e-3 * g["lr_scale"], step, 100, 10))
    assert SegmentConfig.__dataclass_fields__["lr_schedule"].default == "poly"
    from tokenmorph.recipes.config import FinetuneConfig, PretrainConfig

    assert PretrainConfig().lr_schedule == FinetuneConfig().lr_schedule == "cosine"


# ---------------------------------------------------------------------------------------- data
def test_reduce_zero_label():
    mask = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(mask).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall"
    assert ADE20K_CLASSES[-1] == "flag"


def test_rescale_size_is_mmcvs_keep_ratio_rule():
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert rescale_size(512, 4000, (2048, 512)) == (262, 2048)  # the long side binds
    assert rescale_size(375, 500, (None, 512)) == (512, 683)
    assert rescale_size(64, 64, (256, 64)) == (64, 64)


def test_random_crop_respects_the_category_ratio():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 56:] = 1  # class 1 in the last 8 columns
    image = np.zeros((64, 64, 3), np.uint8)
    ok = 0
    for seed in range(100):
        _, m = random_crop(image, mask, 16, np.random.default_rng(seed), 0.75)
        assert m.shape == (16, 16)
        counts = np.bincount(m.reshape(-1), minlength=2)
        ok += counts.min() > 0 and counts.max() / counts.sum() < 0.75
    # an unchecked crop passes ~3% of the time (offsets 45..48 of 49); 11 tries give ~27%
    assert ok >= 15
    _, m = random_crop(image, np.zeros((64, 64), np.uint8), 16, np.random.default_rng(0))
    assert m.shape == (16, 16)  # no window can pass: the 11th is taken unchecked


def test_hsv_round_trip_and_photometric_distortion():
    rng = np.random.default_rng(0)
    x = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    hsv = rgb_to_hsv(x)
    assert hsv[..., 0].max() < 180 and hsv[..., 1].max() <= 255
    assert np.abs(hsv_to_rgb(hsv).astype(int) - x).max() <= 4
    grey = np.repeat(x[..., :1], 3, axis=2)
    assert np.array_equal(hsv_to_rgb(rgb_to_hsv(grey)), grey)
    a = photometric_distortion(x, np.random.default_rng(5))
    b = photometric_distortion(x, np.random.default_rng(5))
    assert np.array_equal(a, b) and a.dtype == np.uint8
    assert any(
        not np.array_equal(photometric_distortion(x, np.random.default_rng(s)), x) for s in range(4)
    )


def test_train_and_eval_transforms():
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    mask = np.random.default_rng(1).integers(0, 3, (40, 60)).astype(np.uint8)
    tf = SegTrainTransform(64, [0.5] * 3, [0.25] * 3, scale=(256, 32))
    x, m = tf(image, mask, np.random.default_rng(0))
    x2, m2 = tf(image, mask, np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(m, m2)
    assert x.shape == (3, 64, 64) and m.shape == (64, 64) and m.dtype == torch.int64
    # the rescaled image (short side 16..64) is smaller than the crop: padded, labels 255 there
    assert set(m.unique().tolist()) <= {0, 1, 2, 255} and (m == 255).any()
    assert (x[:, m == 255] == 0).all()
    ex, em = SegEvalTransform([0.5] * 3, [0.25] * 3, scale=(2048, 80))(image, mask)
    assert ex.shape == (3, 80, 120) and em.shape == (40, 60)  # the mask stays at its size


def test_proxy_set_is_deterministic_and_labelled_by_intensity():
    a, b = FashionMNISTCanvases(train=True), FashionMNISTCanvases(train=True)
    val = FashionMNISTCanvases(train=False)
    assert len(a) == 10000 and len(val) == 1000 and a.classes[0] == "background"
    assert len(a.classes) == 11
    for i in (0, 7, 123):
        (ia, ma), (ib, mb) = a.load(i), b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
        assert ia.shape == (64, 64, 3) and ma.shape == (64, 64)
        grey = ia[..., 0]
        assert (grey[ma > 0] > a.threshold).all()  # an item's pixels are above the threshold
        assert 2 <= len(np.unique(ma)) <= 5  # background + up to 4 items
    assert not np.array_equal(a.load(0)[0], val.load(0)[0])  # the test split's items
    labels = np.concatenate([a.load(i)[1].ravel() for i in range(200)])
    assert set(np.unique(labels)) == set(range(11))


def make_pair(folder, stem, size, mask=None, ext=".jpg"):
    rng = np.random.default_rng(zlib.crc32(stem.encode()))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(
        folder / "images" / f"{stem}{ext}"
    )
    if mask is not False:
        m = mask if mask is not None else rng.integers(0, 3, size).astype(np.uint8)
        Image.fromarray(m).save(folder / "masks" / f"{stem}.png")


def test_bad_pairs_are_skipped_and_counted_or_fail_fast(tmp_path):
    root = tmp_path / "data"
    make_pair(root, "good", (20, 30))
    make_pair(root, "no_mask", (20, 30), mask=False)
    make_pair(root, "wrong_size", (20, 30), mask=np.zeros((10, 10), np.uint8))
    make_pair(root, "label_too_big", (20, 30), mask=np.full((20, 30), 7, np.uint8))
    make_pair(root, "ignored_ok", (20, 30), mask=np.full((20, 30), 255, np.uint8))
    make_pair(root, "broken_image", (20, 30))
    (root / "images" / "broken_image.jpg").write_bytes(b"not a jpeg")
    make_pair(root, "rgb_mask", (20, 30))
    Image.new("RGB", (30, 20)).save(root / "masks" / "rgb_mask.png")
    (root / "classes.txt").write_text("a\nb\nc\n")
    ds = generic_dataset(root)
    assert ds.classes == ["a", "b", "c"] and ds.num_missing == 1 and len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    kept = {ds.pairs[i].image.stem for i, it in enumerate(items) if it is not None}
    assert kept == {"good", "ignored_ok"}
    ds.transform = SegEvalTransform([0.5] * 3, [0.25] * 3, scale=(64, 32))
    images, masks, skipped = collate_skip([ds[i] for i in range(len(ds))])
    assert images.shape == (2, 3, 32, 48) and masks.shape == (2, 20, 30) and skipped == 4
    strict = generic_dataset(root, on_bad_image="skip")
    strict.on_bad_image = "raise"
    messages = []
    for i, pair in enumerate(strict.pairs):
        if pair.image.stem in ("good", "ignored_ok"):
            continue
        with pytest.raises(DataError) as e:
            strict[i]
        messages.append(str(e.value))
        assert pair.image.stem in str(e.value)
        assert str(e.value).endswith(
            "or skip bad files (on_bad_image=skip; on_error='skip' in the API)"
        )
    assert any("is 10x10 but its image" in m for m in messages)
    assert any("outside the 3 classes" in m for m in messages)
    assert any("single-channel" in m for m in messages)
    with pytest.raises(DataError, match="no_mask.jpg has no mask"):
        generic_dataset(root, on_bad_image="raise")
    with pytest.raises(DataError, match="classes.txt"):
        generic_dataset(tmp_path / "other")
