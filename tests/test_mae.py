"""The MAE framework and the Beyond Masking objectives end to end: the model against per-sample
computations, config selection, every objective through `tokenmorph pretrain`, exact resume with
per-sample degradation parameters, reconstruction pictures and the objective benchmark."""

import json

import numpy as np
import pytest
import torch

from tokenmorph.masking import RandomMask
from tokenmorph.models import DECODER_PRESETS, create_mae_student
from tokenmorph.ops.degrade import OBJECTIVES
from tokenmorph.recipes.config import ConfigError, load_config
from tokenmorph.recipes.objectives import (
    PretrainObjective,
    num_random_masked,
    resolve_loss,
    view_side,
)
from tokenmorph.recipes.pretrain import decoder_shape

from .helpers import final_weights, random_masks, read_metrics, run_cli
from .mae_reference import ReferenceMAE, mae_sincos_2d


def test_encoder_sees_only_visible_tokens_per_sample():
    """The batched encoder on the kept tokens equals running timm's blocks on each sample's
       visible
    tokens alone, and the decoder output does not depend on the masked patches' pixels."""
    torch.manual_seed(0)
    m = create_mae_student(
        "tiny", target_dim=48, img_size=32, patch_size=4, depth=2, decoder_depth=1, decoder_dim=64
    ).eval()
    x = torch.rand(3, 3, 32, 32)
    mask = random_masks(3, 64, 48)
    latent = m.forward_features(x, RandomMask.from_mask(mask))
    assert latent.shape == (3, 1 + 16, 192)
    enc = m.encoder
    tokens = enc.patch_embed((x - m.mean) / m.std) + enc.pos_embed[:, 1:]
    for b in range(3):
        vis = tokens[b][~mask[b]]  # token order, as RandomMask.from_mask
        seq = torch.cat([enc.cls_token[0] + enc.pos_embed[0, :1], vis])[None]
        for blk in enc.blocks:
            seq = blk(seq)
        torch.testing.assert_close(latent[b], enc.norm(seq)[0], rtol=1e-5, atol=1e-5)
    # changing the pixels of masked patches changes nothing
    patch_mask = (
        mask.view(3, 8, 8)
        .repeat_interleave(4, 1)
        .repeat_interleave(4, 2)[:, None]
        .expand(-1, 3, -1, -1)
    )
    y = torch.where(patch_mask, torch.rand_like(x), x)
    torch.testing.assert_close(m(x, mask), m(y, mask))
    assert not torch.allclose(m(x), m(y))  # without the mask they matter


def test_position_embeddings_are_fixed_sincos_and_presets():
    m = create_mae_student("tiny", target_dim=8, img_size=32, patch_size=4, depth=1)
    pe = m.encoder.pos_embed
    assert not pe.requires_grad and torch.equal(pe[0, 0], torch.zeros(192))
    # 2-D sin-cos: every value in [-1, 1], one sin/cos pair per frequency (sin^2 + cos^2 = 1
    # summed over pairs)
    assert pe.abs().max() <= 1 and torch.allclose((pe[0, 1:] ** 2).sum(-1), torch.full((64,), 96.0))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "encoder.pos_embed" not in names and "mask_token" in names
    # the release decoder has 6 heads of 64 (Beyond Masking, fidelity row 17), MAE's 16 of 32
    assert DECODER_PRESETS == {"release": (4, 384, 6), "mae": (8, 512, 16)}
    assert decoder_shape(load_config("mae-vit-b16-in1k")) == dict(
        decoder_depth=4, decoder_dim=384, decoder_heads=6
    )
    assert decoder_shape(load_config("mae-demo"))["decoder_heads"] == 4  # 128 wide: 128 / 32
    assert decoder_shape(load_config("smoke", {"decoder": "mae"}))["decoder_heads"] == 16
    with pytest.raises(ValueError, match="same number"):
        RandomMask.from_mask(torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize(
    "framework,objective", [("mae", o) for o in OBJECTIVES] + [("beit", "zoom_in_mask")]
)
def test_objective_masks_and_shapes(framework, objective):
    cfg = load_config(
        "smoke", {"framework": framework, "objective": objective, "teacher": "pixels"}
    )
    from tokenmorph.models.teachers import build_teacher

    teacher = build_teacher("pixels", patch_size=4)
    obj = PretrainObjective(teacher, (8, 8), cfg)
    s = obj.sample(np.random.default_rng(0))
    masked = objective in ("mask", "zoom_in_mask", "zoom_out")
    assert ("mask" in s) == masked
    if masked:
        expected = num_random_masked(64, 0.75) if framework == "mae" else cfg.num_masked
        assert s["mask"].sum() == expected == (48 if framework == "mae" else 24)
    # the zoom-in view has a ring of 1 patch at 32 px / 4; zoom-out crops its 23 px content
    sides = {"zoom_in": 40, "zoom_in_mask": 40, "zoom_out": 23}
    assert view_side(cfg) == sides.get(objective, 32)
    assert resolve_loss(cfg) == "mse"


def test_config_selection_and_errors():
    cfg = load_config(
        "smoke", {"framework": "mae", "objective": "zoom_in_mask", "teacher": "pixels"}
    )
    assert (
        cfg.teacher_kwargs == {}
    )  # the config's timm-teacher arguments do not follow another teacher
    assert load_config("smoke").teacher_kwargs  # ...and stay with their own
    demo = load_config(
        "demo", {"framework": "mae", "objective": "zoom_in_mask", "teacher": "pixels"}
    )
    assert demo.teacher_input_size is None and load_config("demo").teacher_input_size == 128
    assert resolve_loss(load_config("smoke", {"framework": "mae"})) == "dtm"
    with pytest.raises(ConfigError, match="objective='zoom'"):
        load_config("smoke", {"objective": "zoom"})
    with pytest.raises(ConfigError, match="loss_on=masked needs a masked input"):
        load_config("smoke", {"objective": "blur", "loss_on": "masked"})
    with pytest.raises(ConfigError, match="zoom_out_content"):
        load_config("smoke", {"objective": "zoom_out", "zoom_out_content": "12"})
    b = load_config("mae-zoom-in-mask-vit-b16-in1k")
    assert (
        b.framework,
        b.objective,
        b.model,
        b.batch_size,
        b.decoder,
        b.beta2,
        b.ring_loss_weight,
    ) == ("mae", "zoom_in_mask", "base", 2048, "release", 0.95, 0.2)
    assert view_side(b) == 288
    assert load_config("dtm-mae-zoom-in-mask-vit-b16-in1k").teacher == "clip-vit-b16"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_pretrains(photo_dir, tmp_path, objective):
    """The issue's command for every objective, on real photos: finite losses, a checkpoint whose
    encoder the evaluation code loads."""
    out = tmp_path / objective
    proc = run_cli(
        "pretrain",
        "--config",
        "smoke",
        "framework=mae",
        f"objective={objective}",
        "teacher=pixels",
        "decoder_depth=1",
        "decoder_dim=64",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
    )
    assert f"objective {objective}" in proc.stdout
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(
        np.isfinite(r["loss"]) for r in records
    )
    if objective == "zoom_in_mask":
        assert all("masked" in r and "ring" in r for r in records)
    ckpt = final_weights(out)
    assert ckpt["student_arch"]["framework"] == "mae" and ckpt["compat"]["objective"] == objective
    from tokenmorph.hub.backbone import load_backbone

    bb = load_backbone(str(out))
    assert bb.features(torch.rand(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize(
    "framework,objective", [("mae", "mask"), ("mae", "zoom_in_mask"), ("beit", "distort")]
)
def test_dtm_with_degradations(photo_dir, tmp_path, framework, objective):
    """Teacher tokens with the DTM loss in either framework and with the misaligned objective."""
    out = tmp_path / "run"
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        f"framework={framework}",
        f"objective={objective}",
        "decoder_depth=1",
        "decoder_dim=64",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
    )
    records = read_metrics(out)
    assert all(np.isfinite(r["loss"]) and r["groups"] > 0 for r in records)
    assert final_weights(out)["compat"]["loss"] == "dtm"


def test_mae_resume_is_exact(photo_dir, tmp_path):
    """Per-sample degradation parameters and masks are a function of the sample: a resumed run
    matches."""
    args = [
        "framework=mae",
        "objective=distort",
        "teacher=pixels",
        "decoder_depth=1",
        "decoder_dim=64",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        *args,
        "--data",
        str(photo_dir),
        "--output-dir",
        str(a),
        "--max-steps",
        "6",
    )
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        *args,
        "stop_after=2",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(b),
        "--max-steps",
        "6",
    )
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        *args,
        "--data",
        str(photo_dir),
        "--output-dir",
        str(b),
        "--max-steps",
        "6",
    )
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]
    wa, wb = final_weights(a)["model"], final_weights(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_viz_reconstruct(photo_dir, tmp_path):
    out = tmp_path / "run"
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        "framework=mae",
        "objective=zoom_in_mask",
        "teacher=pixels",
        "decoder_depth=1",
        "decoder_dim=64",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
    )
    png = tmp_path / "rec.png"
    proc = run_cli(
        "viz",
        "reconstruct",
        "--checkpoint",
        str(out),
        "--image",
        "skimage:astronaut",
        "skimage:coffee",
        "--out",
        str(png),
    )
    assert "zoom_in_mask" in proc.stdout and png.stat().st_size > 10_000
    from PIL import Image

    w, h = Image.open(png).size
    assert w > h  # 4 columns x 2 rows

    dtm = tmp_path / "dtm"
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        "framework=mae",
        "decoder_depth=1",
        "decoder_dim=64",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(dtm),
        "--max-steps",
        "1",
    )
    bad = run_cli(
        "viz",
        "reconstruct",
        "--checkpoint",
        str(dtm),
        "--image",
        "skimage:astronaut",
        "--out",
        str(png),
        check=False,
    )
    assert (
        bad.returncode == 2
        and "needs a run with teacher=pixels" in bad.stderr
        and "Traceback" not in bad.stderr
    )


@pytest.mark.parametrize("norm", ["per_channel", "joint", "input"])
def test_reconstruct_statistics(norm):
    """The prediction turned into pixels: a perfect prediction gives back the target with
    'target' statistics, for every pixel norm; with 'visible' statistics the visible patches are
    exact as well."""
    from tokenmorph.data import load_image
    from tokenmorph.eval.reconstruct import reconstruct
    from tokenmorph.models.teachers import build_teacher

    cfg = load_config(
        "smoke",
        {"framework": "mae", "objective": "mask", "teacher": "pixels", "pixel_norm": norm},
    )
    teacher = build_teacher("pixels", patch_size=4, norm=norm)

    class Oracle(torch.nn.Module):  # predicts the normalised clean patches exactly
        grid = (8, 8)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

        def forward(self, images, mask=None):
            return teacher(images, self.grid)

    images = torch.stack([load_image("skimage:astronaut", 32), load_image("skimage:coffee", 32)])
    r = reconstruct(Oracle(), cfg, images, stats="target")
    assert r["loss"] < 1e-10
    torch.testing.assert_close(r["prediction"], images, atol=1e-5, rtol=0)
    v = reconstruct(Oracle(), cfg, images, stats="visible")
    seen = (v["input"] != 0.5).all(1, keepdim=True).expand_as(images)  # not the grey mask
    torch.testing.assert_close(v["prediction"][seen], images[seen], atol=1e-5, rtol=0)
    if norm != "input":  # masked patches did not get their own stats
        assert (v["prediction"] - images).abs()[~seen].mean() > 1e-3


def test_bench_objectives_cli():
    proc = run_cli(
        "bench",
        "pretrain",
        "--json",
        "--framework",
        "beit,mae",
        "--objective",
        "mask,zoom_in_mask",
        "--model",
        "tiny",
        "--teacher",
        "pixels",
        "--img-size",
        "32",
        "--patch-size",
        "4",
        "--batch-size",
        "4",
        "--steps",
        "1",
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(x["framework"], x["objective"]): x for x in r["results"]}
    assert set(rows) == {
        ("beit", "mask"),
        ("beit", "zoom_in_mask"),
        ("mae", "mask"),
        ("mae", "zoom_in_mask"),
    }
    assert (
        rows[("mae", "mask")]["step_vs_beit"] > 0
        and rows[("mae", "zoom_in_mask")]["step_vs_mask"] > 0
    )
    # the benchmark runs the real objective: the best practice's two loss terms are there
    assert {"masked", "ring", "loss"} <= set(rows[("mae", "zoom_in_mask")]["last_step_logs"])
    assert set(rows[("mae", "mask")]["phases_s"]) == {
        "teacher",
        "student_forward",
        "loss_and_degradation",
        "backward",
        "optimizer",
    }
    bad = run_cli("bench", "pretrain", "--objective", "zoom", check=False)
    assert bad.returncode == 2 and "not one of" in bad.stderr


def test_misaligned_objective_never_masks_output_tokens():
    """zoom_in_mask with teacher tokens: MSE / DTM over the whole output frame (the input mask
           marks
    input-frame tokens), and loss_on=masked is refused."""
    from tokenmorph.models.teachers import build_teacher

    with pytest.raises(ConfigError, match="loss_on=masked does not apply"):
        load_config("smoke", {"objective": "zoom_in_mask", "loss_on": "masked"})
    cfg = load_config("smoke", {"framework": "mae", "objective": "zoom_in_mask", "loss": "mse"})
    teacher = build_teacher(
        "timm:vit_tiny_patch16_224", random_init=True, img_size=32, patch_size=4, depth=1
    )
    obj = PretrainObjective(teacher, (8, 8), cfg)
    s = obj.sample(np.random.default_rng(0))
    batch = {
        "images": torch.rand(1, 3, 40, 40),
        "extra": {"mask": torch.as_tensor(s["mask"])[None]},
    }
    pred = torch.zeros(1, 64, teacher.dim)
    loss, _ = obj(lambda images, mask: pred, batch, 0)
    # the teacher's tokens of the whole view, area-resized as the release resizes it, every
    # one in the loss
    view = torch.nn.functional.interpolate(batch["images"], size=(32, 32), mode="area")
    target = teacher(view, (8, 8))
    torch.testing.assert_close(loss, target.pow(2).mean())


# ---------------------------------------------------------------------------- MAE's own rules
IMNET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMNET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _photos(size):
    from tokenmorph.data import sample_photo

    return torch.stack([sample_photo("astronaut", size), sample_photo("chelsea", size)])


def _np_patchify(img, p):
    """(B, C, H, W) -> (B, N, p*p*C) with loops: row-major tokens, (y, x, c) inside."""
    B, C, H, W = img.shape
    return np.stack(
        [
            img[:, :, i : i + p, j : j + p].transpose(0, 2, 3, 1).reshape(B, -1)
            for i in range(0, H, p)
            for j in range(0, W, p)
        ],
        axis=1,
    )


def test_joint_pixel_norm_is_maes_norm_pix_loss():
    """pixel_norm=joint = MAE's forward_loss with norm_pix_loss: the patch of the ImageNet-
    normalised image over all 768 values, (x - mean) / sqrt(var + 1e-6), unbiased var;
    pixel_norm=input = the normalised patch itself (MAE without norm_pix_loss)."""
    from tokenmorph.models.teachers import PixelTeacher

    img = _photos(224)
    xn = ((img - IMNET_MEAN) / IMNET_STD).numpy().astype(np.float64)
    tok = _np_patchify(xn, 16)
    ref = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, ddof=1, keepdims=True) + 1e-6)
    joint = PixelTeacher(16, "joint")(img, (14, 14)).numpy()
    assert np.abs(joint - ref).max() < 2e-4
    # the old rule (biased variance of the [0, 1] patch) is a different target
    raw = _np_patchify(img.numpy().astype(np.float64), 16)
    old = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-6)
    assert np.abs(old - ref).max() > 0.5
    assert np.abs(PixelTeacher(16, "input")(img, (14, 14)).numpy() - tok).max() < 1e-5
    # another data set's statistics normalise the image first
    stats = (0.2860406,) * 3, (0.3530242,) * 3
    t = PixelTeacher(4, "joint", mean=stats[0], std=stats[1])
    xs = (img[:, :, :32, :32].numpy() - 0.2860406) / 0.3530242
    tok = _np_patchify(xs.astype(np.float64), 4)
    ref = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, ddof=1, keepdims=True) + 1e-6)
    assert np.abs(t(img[:, :, :32, :32], (8, 8)).numpy() - ref).max() < 2e-4


def test_mae_demo_targets_joint_and_its_scale_on_fashion_mnist():
    """mae-demo uses MAE's joint targets with the data set's statistics; on Fashion-MNIST (grey,
    equal channel statistics) they are the per-channel targets times sqrt(47/45) (unbiased
    variance over 48 values against over 16), the reason given in the config."""
    from tokenmorph.data import load_image
    from tokenmorph.models.teachers import PixelTeacher
    from tokenmorph.recipes.pretrain import build_student_and_teacher

    cfg = load_config("mae-demo")
    _, teacher = build_student_and_teacher(cfg, torch.device("cpu"))
    assert teacher.norm == "joint" and teacher.image_mean == (0.2860406,) * 3
    for name in ("mae-zoom-in-mask-demo", "mae-blur-demo", "mae-vit-b16-in1k"):
        expected = "joint" if name == "mae-vit-b16-in1k" else "per_channel"
        assert load_config(name).pixel_norm == expected
    img = torch.stack([load_image(f"fashion-mnist:{i}", 32) for i in range(4)])
    joint = teacher(img, (8, 8))
    per = PixelTeacher(4, "per_channel")(img, (8, 8))
    raw = img.unflatten(2, (8, 4)).unflatten(4, (8, 4))  # (B, 3, 8, 4, 8, 4)
    textured = raw.std(dim=(3, 5))[:, 0].flatten(1) > 0.05  # patches far from flat
    ratio = joint[textured] / per[textured]
    big = per[textured].abs() > 0.5
    assert torch.allclose(ratio[big], torch.full_like(ratio[big], (47 / 45) ** 0.5), rtol=2e-3)


def test_sincos_is_maes_channel_order_and_timms_reordered():
    from timm.layers import build_sincos2d_pos_embed

    from tokenmorph.models.mae import sincos_pos_embed

    ours = sincos_pos_embed((14, 14), 768)
    ref = torch.from_numpy(mae_sincos_2d(768, 14)).float()[None]
    assert torch.equal(ours, ref)  # float64 maths, then float32, as MAE
    m = create_mae_student(
        "tiny", target_dim=48, img_size=32, patch_size=4, depth=1, decoder_dim=64
    )
    assert torch.equal(m.encoder.pos_embed, torch.from_numpy(mae_sincos_2d(192, 8)).float()[None])
    assert torch.equal(m.decoder_pos_embed, torch.from_numpy(mae_sincos_2d(64, 8)).float()[None])
    # timm's table: [sin(row), sin(col), cos(row), cos(col)] in float32
    t = build_sincos2d_pos_embed([14, 14], 768).view(196, 2, 2, 192)
    reordered = torch.cat([t[:, 0, 1], t[:, 1, 1], t[:, 0, 0], t[:, 1, 0]], dim=1)
    assert (reordered - ours[0, 1:]).abs().max() < 1e-5
    assert (build_sincos2d_pos_embed([14, 14], 768) - ours[0, 1:]).abs().max() > 0.5


def test_mae_initialisation_is_maes():
    """xavier-uniform for every Linear (the fused qkv's bound sqrt(6 / 4D)) and for the patch
    embedding as a (D, 3 p p) Linear, whose bias keeps PyTorch's default U(+-1/sqrt(3 p p));
    CLS and mask tokens N(0, 0.02) untruncated; Linear biases 0; LayerNorm (1, 0)."""
    torch.manual_seed(0)
    m = create_mae_student(
        "small", target_dim=768, depth=2, decoder_depth=1, decoder_dim=512, decoder_heads=16
    )

    def xavier(w, fan_in, fan_out):
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)

    blk = m.encoder.blocks[0]
    xavier(blk.attn.qkv.weight, 384, 1152)
    xavier(blk.mlp.fc1.weight, 384, 1536)
    xavier(m.decoder_blocks[0].attn.qkv.weight, 512, 1536)
    xavier(m.decoder_embed.weight, 384, 512)
    xavier(m.decoder_pred.weight, 512, 768)
    xavier(m.encoder.patch_embed.proj.weight.flatten(1), 768, 384)
    b = m.encoder.patch_embed.proj.bias
    assert b.abs().max() <= 768**-0.5 and b.abs().max() > 0.9 * 768**-0.5
    for name, p in m.named_parameters():
        if name.endswith("bias") and "patch_embed" not in name:  # Linear and LayerNorm: 0
            assert torch.equal(p, torch.zeros_like(p)), name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    tokens = torch.cat([m.encoder.cls_token.flatten(), m.mask_token.flatten()])
    assert tokens.std().item() == pytest.approx(0.02, rel=0.15)
    assert tokens.abs().max() > 0.045  # beyond 2 std: not truncated


def _tiny_student(**kw):
    defaults = dict(target_dim=48, img_size=32, patch_size=4, depth=2, decoder_depth=1)
    return create_mae_student("tiny", **defaults | dict(decoder_dim=64, decoder_heads=2) | kw)


def test_official_mae_checkpoints_load_strictly_and_compute_maes_function(tmp_path):
    """Files in both official layouts, written by an independent MAE (tests/mae_reference.py),
    load into the student strictly: every tensor in place, and the student computes MAE's
    encoder and (visualize layout) its whole autoencoder on a real photo."""
    from tokenmorph.hub.mae_checkpoint import load_mae_checkpoint

    x = _photos(32)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    for with_decoder in (True, False):
        ref = ReferenceMAE(decoder=with_decoder, seed=3).eval()
        path = ref.save(tmp_path / f"mae_{with_decoder}.pth")
        student = _tiny_student().eval()
        before = {k: v.clone() for k, v in student.state_dict().items()}
        note = load_mae_checkpoint(student, str(path))
        assert ("visualize" if with_decoder else "encoder") + " layout" in note
        own = student.state_dict()
        for k, v in ref.state_dict().items():
            ours = own[k if k.startswith("decoder") or k == "mask_token" else f"encoder.{k}"]
            assert torch.equal(ours, v), k
        with torch.no_grad():
            keep = noise.argsort(1)[:, :16]  # MAE's random_masking: the 16 smallest noises
            mask = torch.ones(2, 64, dtype=torch.bool).scatter(1, keep, False)
            latent_ref = ref.forward_encoder((x - IMNET_MEAN) / IMNET_STD, keep)
            latent = student.forward_features(x, RandomMask.from_mask(mask))
            # MAE keeps the visible tokens in noise order, the student in token order
            order = keep.argsort(1)
            latent_ref = torch.cat(
                [
                    latent_ref[:, :1],
                    latent_ref[:, 1:].gather(1, order[..., None].expand(-1, -1, 192)),
                ],
                1,
            )
            torch.testing.assert_close(latent, latent_ref, atol=2e-5, rtol=1e-4)
            if with_decoder:
                pred_ref, ref_mask = ref((x - IMNET_MEAN) / IMNET_STD, noise)
                assert torch.equal(ref_mask, mask)
                torch.testing.assert_close(student(x, mask), pred_ref, atol=2e-5, rtol=1e-4)
            else:  # the decoder keeps its fresh initialisation
                assert "decoder and mask token initialised fresh" in note
                assert all(
                    torch.equal(own[k], before[k])
                    for k in own
                    if k.startswith("decoder") or k == "mask_token"
                )


def test_official_mae_checkpoint_errors_name_the_keys(tmp_path):
    from tokenmorph.errors import CheckpointError
    from tokenmorph.hub.mae_checkpoint import load_mae_checkpoint

    sd = ReferenceMAE(seed=1).state_dict()
    cases = {
        "missing keys [encoder.blocks.1.mlp.fc2.bias]": {
            k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"
        },
        "unexpected keys [head.weight]": sd | {"head.weight": torch.zeros(10, 192)},
        "not an MAE checkpoint": {f"encoder.{k}": v for k, v in sd.items()},
    }
    for message, state in cases.items():
        path = tmp_path / "bad.pth"
        torch.save({"model": state}, path)
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_mae_checkpoint(_tiny_student(), str(path))
    deeper = ReferenceMAE(depth=3, seed=1).save(tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[encoder.blocks.2"):
        load_mae_checkpoint(_tiny_student(), str(deeper))
    with pytest.raises(CheckpointError, match="other shapes"):
        load_mae_checkpoint(_tiny_student(decoder_dim=32), str(ReferenceMAE(seed=1).save(path)))


@pytest.mark.parametrize("with_decoder", [False, True])
def test_pretrain_continues_from_an_official_mae_checkpoint(photo_dir, tmp_path, with_decoder):
    """init_weights: the run starts from the file's weights (lr 0 keeps them: the checkpoint
    written after one step holds exactly the file's tensors), and says what it loaded."""
    ref = ReferenceMAE(decoder=with_decoder, seed=5)
    path = ref.save(tmp_path / "mae.pth")
    out = tmp_path / "run"
    proc = run_cli(
        "pretrain",
        "--config",
        "smoke",
        "framework=mae",
        "teacher=pixels",
        "decoder_depth=1",
        "decoder_dim=64",
        f"init_weights={path}",
        "lr=0",
        "min_lr=0",
        "weight_decay=0",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
    )
    layout = "visualize" if with_decoder else "encoder"
    assert f"initialised from {path} (MAE {layout} layout" in proc.stdout
    weights = final_weights(out)["model"]
    for k, v in ref.state_dict().items():
        ours = weights[k if k.startswith("decoder") or k == "mask_token" else f"encoder.{k}"]
        assert torch.equal(ours, v), k
    bad = run_cli(
        "pretrain", "--config", "smoke", f"init_weights={path}", "--data", str(photo_dir),
        "--output-dir", str(tmp_path / "beit"), check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs framework=mae" in bad.stderr


def test_viz_reconstruct_of_an_official_mae_checkpoint(tmp_path):
    from PIL import Image

    vis = ReferenceMAE(seed=2).save(tmp_path / "mae_visualize.pth")
    png = tmp_path / "rec.png"
    proc = run_cli(
        "viz", "reconstruct", "--mae-checkpoint", str(vis), "--image", "skimage:astronaut",
        "skimage:coffee", "--out", str(png),
    )  # fmt: skip
    assert "MAE release" in proc.stdout and "objective mask" in proc.stdout
    assert Image.open(png).size[0] > Image.open(png).size[1]
    enc = ReferenceMAE(decoder=False, seed=2).save(tmp_path / "mae_pretrain.pth")
    bad = run_cli(
        "viz", "reconstruct", "--mae-checkpoint", str(enc), "--image", "skimage:astronaut",
        "--out", str(png), check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "encoder only" in bad.stderr and "Traceback" not in bad.stderr


def test_mae_step_loss_is_the_masked_token_mse():
    """MAE's forward_loss: per-token mean of the squared error over its values, averaged over
    the masked tokens only (joint targets of the normalised image)."""
    from tokenmorph.models.teachers import PixelTeacher
    from tokenmorph.runtime.sampling import collate_keyed

    cfg = load_config("mae-demo", {"data": "imagenet"})
    obj = PretrainObjective(PixelTeacher(4, "joint"), (8, 8), cfg)
    img = _photos(32)
    batch = collate_keyed(
        [(im, 0, obj.sample(np.random.default_rng(i))) for i, im in enumerate(img)]
    )
    pred = torch.randn(2, 64, 48, generator=torch.Generator().manual_seed(0))
    loss, _ = obj(lambda x, m: pred, batch, 0)
    xn = ((img - IMNET_MEAN) / IMNET_STD).numpy().astype(np.float64)
    tok = _np_patchify(xn, 4)
    tgt = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_token = ((pred.numpy() - tgt) ** 2).mean(-1)
    m = batch["extra"]["mask"].numpy()
    assert m.sum() == 96 and float(loss) == pytest.approx(per_token[m].mean(), rel=1e-4)


def test_recipes_choose_the_release_rows():
    """The recipes' choices of docs/fidelity.md rows (their comments say which)."""
    mae = load_config("mae-vit-b16-in1k")
    assert (mae.pixel_norm, mae.crop_scale_min, mae.hflip, mae.crop_interpolation) == (
        "joint",
        0.2,
        True,
        "bicubic",
    )
    assert (mae.color_jitter, mae.beta1, mae.beta2, mae.weight_decay) == (0.0, 0.9, 0.95, 0.05)
    for name in ("zoom-in", "zoom-in-mask", "zoom-out", "distort", "blur", "decolorize"):
        cfg = load_config(f"mae-{name}-vit-b16-in1k")
        assert cfg.pixel_norm == "per_channel" and cfg.decoder == "release", name
        assert cfg.mask_ratio == 0.75 and cfg.chunk_size == 128
    deco = load_config("mae-decolorize-vit-b16-in1k")
    assert (deco.crop_scale_min, deco.crop_interpolation, deco.hflip) == (0.08, "bilinear", False)
    assert deco.decolorize_saturation == 0.3
    demo = load_config("mae-decolorize-demo")
    assert (demo.crop_interpolation, demo.hflip, demo.pixel_norm) == (
        "bilinear",
        False,
        "per_channel",
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_reconstruct_draws_every_objective_in_its_loss_frame(objective):
    """The pictures' frames: the input frame, the zoom-in view, the zoom-out canvas (whose clean
    target is the symmetric pad of the content)."""
    from tokenmorph.data import load_image
    from tokenmorph.eval.reconstruct import reconstruct

    cfg = load_config("smoke", {"framework": "mae", "objective": objective, "teacher": "pixels"})
    student = _tiny_student(depth=1).eval()
    side = view_side(cfg)
    images = torch.stack([load_image("skimage:coffee", side), load_image("skimage:rocket", side)])
    r = reconstruct(student, cfg, images)
    frame = {"zoom_in": 40, "zoom_in_mask": 40}.get(objective, 32)
    for key in ("input", "prediction", "target"):
        assert r[key].shape == (2, 3, frame, frame), key
    assert np.isfinite(r["loss"]) and (r["pasted"] is None) == (
        objective not in ("mask", "zoom_in_mask", "zoom_out")
    )
    if objective == "zoom_out":  # the canvas of the area-resized content, about the input canvas
        seen = (r["input"] != 0.5).all(1, keepdim=True).expand_as(r["target"])
        assert (r["target"] - r["input"]).abs()[seen].mean() < 0.05
