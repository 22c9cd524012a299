"""Checkpoints of the official DTM release (naver-ai/dtm ``checkpoint-*.pth``) load into the
student strictly: the release layout is built here by an independent renaming of a student's
modules, in the release's key order (release-rules.md 2), with the release's
``relative_position_index`` written from its own rule."""

import argparse
import json

import pytest
import torch

from tokenmorph.errors import CheckpointError
from tokenmorph.hub.backbone import load_backbone
from tokenmorph.hub.export import export_encoder
from tokenmorph.hub.release_weights import load_dtm_release
from tokenmorph.models import create_student
from tokenmorph.models.layouts import dtm_release_to_student


def release_index(side: int) -> torch.Tensor:
    """The release's RelativePositionBias index, from its rule: patch tokens q=(hq, wq) and
    k=(hk, wk) get (hq - hk + side - 1) * (2 side - 1) + (wq - wk + side - 1); the CLS row gets
    num_rel - 3, the CLS column num_rel - 2 (written after the row), [0, 0] num_rel - 1."""
    n, width = side * side, 2 * side - 1
    num_rel = width * width + 3
    idx = torch.zeros(n + 1, n + 1, dtype=torch.long)
    for q in range(n):
        for k in range(n):
            (hq, wq), (hk, wk) = divmod(q, side), divmod(k, side)
            idx[1 + q, 1 + k] = (hq - hk + side - 1) * width + (wq - wk + side - 1)
    idx[0, :] = num_rel - 3
    idx[:, 0] = num_rel - 2
    idx[0, 0] = num_rel - 1
    return idx


def release_state(student) -> dict:
    """The DTM release's ``model.state_dict()`` of the same weights, key by key in its order."""
    enc, side = student.encoder, student.grid[0]
    out = {
        "cls_token": enc.cls_token,
        "mask_token": student.mask_token,
        "patch_embed.proj.weight": enc.patch_embed.proj.weight,
        "patch_embed.proj.bias": enc.patch_embed.proj.bias,
    }
    if enc.rel_pos_bias is not None:
        out["rel_pos_bias.relative_position_bias_table"] = (
            enc.rel_pos_bias.relative_position_bias_table
        )
        out["rel_pos_bias.relative_position_index"] = release_index(side)
    for i, blk in enumerate(enc.blocks):
        a, p = blk.attn, f"blocks.{i}."
        out.update(
            {
                p + "gamma_1": blk.gamma_1,
                p + "gamma_2": blk.gamma_2,
                p + "norm1.weight": blk.norm1.weight,
                p + "norm1.bias": blk.norm1.bias,
                p + "attn.q_bias": a.q_bias,
                p + "attn.v_bias": a.v_bias,
            }
        )
        if a.relative_position_bias_table is not None:
            out[p + "attn.relative_position_bias_table"] = a.relative_position_bias_table
            out[p + "attn.relative_position_index"] = release_index(side)
        out.update(
            {
                p + "attn.qkv.weight": a.qkv.weight,
                p + "attn.proj.weight": a.proj.weight,
                p + "attn.proj.bias": a.proj.bias,
                p + "norm2.weight": blk.norm2.weight,
                p + "norm2.bias": blk.norm2.bias,
                p + "mlp.fc1.weight": blk.mlp.fc1.weight,
                p + "mlp.fc1.bias": blk.mlp.fc1.bias,
                p + "mlp.fc2.weight": blk.mlp.fc2.weight,
                p + "mlp.fc2.bias": blk.mlp.fc2.bias,
            }
        )
    out.update(
        {
            "norm.weight": enc.norm.weight,
            "norm.bias": enc.norm.bias,
            "lm_head.weight": student.head.weight,
            "lm_head.bias": student.head.bias,
        }
    )
    return {k: v.detach().clone() for k, v in out.items()}


def random_student(rel_pos="both", seed=0, **kw):
    torch.manual_seed(seed)
    student = create_student(
        kw.pop("size", "tiny"),
        target_dim=kw.pop("target_dim", 24),
        drop_path_rate=0.0,
        rel_pos=rel_pos,
        **kw,
    )
    with torch.no_grad():  # every weight random, so that a swapped key shows
        for p in student.parameters():
            p.normal_(0.0, 0.05)
    return student.eval()


def save_release(path, state, args=True):
    extra = {}
    if args:
        extra["args"] = argparse.Namespace(imagenet_default_mean_and_std=True, model="dtm_base")
    torch.save({"model": state, "optimizer": {}, "epoch": 299, "scaler": {}, **extra}, path)
    return path


def test_base_release_layout_has_the_releases_214_keys_and_maps_onto_the_student():
    # ViT-B's depth, heads and grid; a narrow width keeps the test fast (keys do not depend on it)
    student = random_student(size="base", target_dim=512, embed_dim=96)
    state = release_state(student)
    assert len(state) == 214 and list(state)[:6] == [
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rel_pos_bias.relative_position_bias_table",
        "rel_pos_bias.relative_position_index",
    ]
    assert state["rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    mapped, report = dtm_release_to_student(state)
    assert set(mapped) == set(student.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in student.state_dict().items())
    assert len(report.checked) == 13 and sum(report.renamed.values()) == 201
    assert report.arch == dict(
        framework="beit",
        img_size=224,
        patch_size=16,
        embed_dim=96,
        depth=12,
        num_heads=12,
        init_values=0.1,
        rel_pos="both",
        target_dim=512,
    )


@pytest.mark.parametrize("rel_pos", ["both", "shared", "per_block"])
def test_a_release_checkpoint_loads_strictly_and_computes_the_same(rel_pos, tmp_path):
    student = random_student(rel_pos, img_size=32, patch_size=4, depth=2)
    path = save_release(tmp_path / "checkpoint-299.pth", release_state(student))
    loaded, report = load_dtm_release(path)
    assert loaded.arch["rel_pos"] == rel_pos and report.arch["img_size"] == 32
    theirs = loaded.state_dict()
    assert set(theirs) == set(student.state_dict())
    assert all(torch.equal(theirs[k], v) for k, v in student.state_dict().items())
    x = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, mask), student(x, mask))
    text = "\n".join(report.lines())
    assert "lm_head.* -> head.*" in text and "relative_position_index" in text
    # evaluation (and fine-tuning, export) take it as dtm-release:FILE
    backbone = load_backbone(f"dtm-release:{path}")
    assert tuple(backbone.mean) == pytest.approx((0.485, 0.456, 0.406))
    with torch.no_grad():
        assert torch.equal(backbone.tokens(x), student.forward_features(x))
    if rel_pos == "both":  # and export: a per-block timm Beit of the same function
        import timm

        weights, json_path = export_encoder(f"dtm-release:{path}", tmp_path / "enc.safetensors")
        spec = json.loads(json_path.read_text())
        model = timm.create_model(
            spec["timm_model"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(weights)),
            **spec["kwargs"],
        ).eval()
        mean, std = (
            torch.tensor(spec["mean"]).view(1, 3, 1, 1),
            torch.tensor(spec["std"]).view(1, 3, 1, 1),
        )
        with torch.no_grad():
            torch.testing.assert_close(
                model.forward_features((x - mean) / std), student.forward_features(x)
            )


def test_normalisation_follows_the_releases_arguments(tmp_path):
    student = random_student(img_size=32, patch_size=4, depth=1)
    state = release_state(student)
    torch.save({"model": state, "args": argparse.Namespace(model="x")}, tmp_path / "a.pth")
    loaded, _ = load_dtm_release(tmp_path / "a.pth")  # the script's default: 0.5 / 0.5
    assert loaded.mean.flatten().tolist() == [0.5] * 3 == loaded.std.flatten().tolist()
    loaded, _ = load_dtm_release(save_release(tmp_path / "b.pth", state, args=False))
    assert loaded.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_bad_release_checkpoints_are_one_line_errors(tmp_path):
    student = random_student(img_size=32, patch_size=4, depth=2)
    good = release_state(student)
    cases = []
    wrong_index = dict(good)
    wrong_index["blocks.1.attn.relative_position_index"] = release_index(8).t().contiguous()
    cases.append((wrong_index, "indexed differently"))
    stray = dict(good, **{"lm_head_sg.weight": torch.zeros(2)})
    cases.append((stray, "lm_head_sg.weight"))
    missing = {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.bias"}
    cases.append((missing, "blocks.1.mlp.fc2.bias"))
    cases.append(({"model_ema": 1}, "not a DTM release"))
    for i, (state, message) in enumerate(cases):
        path = save_release(tmp_path / f"c{i}.pth", state)
        with pytest.raises(CheckpointError, match=message) as e:
            load_dtm_release(path)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_dtm_release(tmp_path / "none.pth")
