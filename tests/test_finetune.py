"""Fine-tuning end to end on an ImageFolder tree of real photos, from a smoke pre-training
checkpoint."""

import json

import numpy as np
import pytest
import torch

from tokenmorph.models import student_from_checkpoint
from tokenmorph.models.layouts import per_block_tables
from tokenmorph.recipes.config import load_config, parse_overrides
from tokenmorph.recipes.finetune import build_model, finetune_no_weight_decay, posterize
from tokenmorph.runtime.checkpoints import latest_checkpoint, load_checkpoint

from .helpers import final_weights, read_metrics, run_cli, smoke_args


@pytest.fixture(scope="module")
def pretrained(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "2",
    )
    return out


def finetune(pretrained, class_tree, out, *extra, check=True):
    return run_cli(
        "finetune",
        "--config",
        "fashion-mnist-tiny",
        "--checkpoint",
        str(pretrained),
        "--data",
        str(class_tree / "train"),
        "--val-data",
        str(class_tree / "val"),
        "--output-dir",
        str(out),
        "batch_size=8",
        "num_workers=0",
        "log_every=1",
        "warmup_steps=1",
        *extra,
        check=check,
    )


def test_finetune_end_to_end_and_exact_resume(pretrained, class_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    proc = finetune(pretrained, class_tree, a, "--max-steps", "4")
    assert "new keys ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["classes"] == 3 and summary["val_images"] == 12
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    ckpt = load_checkpoint(latest_checkpoint(a))
    assert ckpt["kind"] == "finetune" and ckpt["timm_kwargs"]["num_classes"] == 3
    finetune(pretrained, class_tree, b, "--max-steps", "4", "stop_after=2")
    finetune(pretrained, class_tree, b, "--max-steps", "4")
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]
    wa, wb = final_weights(a)["model"], final_weights(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def randomise_tables(student, seed=0):
    """Non-zero own and shared relative position tables (a fresh or briefly trained student has
    them near zero, which would hide a wrong merge)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.encoder.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return student


def test_finetune_model_starts_as_the_pretrained_encoder(pretrained):
    """The default (the release's documented --init_both_rpb): one table per block = its own +
    the shared one, and the fine-tuning model computes the pre-trained encoder's function."""
    student = student_from_checkpoint(load_checkpoint(latest_checkpoint(pretrained))).eval()
    assert student.arch["rel_pos"] == "both"
    randomise_tables(student)
    cfg = load_config(
        "fashion-mnist-tiny", parse_overrides(["global_pool=token", "drop_path=0"]), kind="finetune"
    )
    assert cfg.rel_pos_init == "own_plus_shared"
    model, kwargs, report = build_model(cfg, 3, student, "x")
    assert kwargs["use_rel_pos_bias"] and not kwargs["use_shared_rel_pos_bias"]
    assert report["new"] == ["head.bias", "head.weight"] and report["dropped"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().forward_features(x), student.encoder.forward_features(x)
        )
    enc = student.encoder
    shared = enc.rel_pos_bias.relative_position_bias_table
    own = [b.attn.relative_position_bias_table for b in enc.blocks]
    for i in range(2):
        assert torch.equal(model.blocks[i].attn.relative_position_bias_table, own[i] + shared)


def test_the_other_relative_position_starts(pretrained):
    """shared_only (the release script's default, BEiT v2's), own_only, as_pretrained."""
    student = randomise_tables(
        student_from_checkpoint(load_checkpoint(latest_checkpoint(pretrained))).eval(), seed=1
    )
    state, enc = student.encoder.state_dict(), student.encoder
    shared = enc.rel_pos_bias.relative_position_bias_table
    key = "blocks.{}.attn.relative_position_bias_table"
    shared_only, own_only = (
        per_block_tables(state, 2, "shared_only"),
        per_block_tables(state, 2, "own_only"),
    )
    for i in range(2):
        assert torch.equal(shared_only[key.format(i)], shared)
        assert torch.equal(own_only[key.format(i)], enc.blocks[i].attn.relative_position_bias_table)
    assert "rel_pos_bias.relative_position_bias_table" not in shared_only
    for rule, expected in (("shared_only", shared_only), ("own_only", own_only)):
        cfg = load_config("fashion-mnist-tiny", {"rel_pos_init": rule}, kind="finetune")
        model, _, _ = build_model(cfg, 3, student, "x")
        for i in range(2):
            assert torch.equal(
                model.blocks[i].attn.relative_position_bias_table, expected[key.format(i)]
            )
    cfg = load_config(
        "fashion-mnist-tiny",
        {"rel_pos_init": "as_pretrained", "global_pool": "token"},
        kind="finetune",
    )
    model, kwargs, _ = build_model(cfg, 3, student, "x")
    assert kwargs["use_rel_pos_bias"] and kwargs["use_shared_rel_pos_bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), enc.forward_features(x))


def test_finetune_weight_decay_is_the_releases(pretrained):
    """run_class_finetuning.py: skip = {pos_embed, cls_token}, 1-D parameters exempt; the
    per-block relative position tables are decayed."""
    from timm.optim import param_groups_layer_decay

    student = student_from_checkpoint(load_checkpoint(latest_checkpoint(pretrained)))
    cfg = load_config("fashion-mnist-tiny", kind="finetune")
    model, _, _ = build_model(cfg, 3, student, "x")
    groups = param_groups_layer_decay(
        model,
        0.05,
        no_weight_decay_list=finetune_no_weight_decay(model, student.arch),
        layer_decay=0.75,
    )
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        release_rule = not (
            p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        )
        assert (id(p) in decayed) == release_rule, name
    assert id(model.blocks[0].attn.relative_position_bias_table) in decayed


def test_finetune_errors_are_one_line(pretrained, class_tree, photo_dir, tmp_path):
    proc = run_cli(
        "finetune",
        "--config",
        "fashion-mnist-tiny",
        "--checkpoint",
        str(tmp_path / "none"),
        "--data",
        str(class_tree / "train"),
        "--val-data",
        str(class_tree / "val"),
        check=False,
    )
    assert (
        proc.returncode == 2
        and "no checkpoint found" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    proc = run_cli(
        "finetune",
        "--config",
        "fashion-mnist-tiny",
        "--checkpoint",
        str(pretrained),
        "--data",
        str(photo_dir),
        "--val-data",
        str(class_tree / "val"),
        check=False,
    )
    # a flat folder of photos has no classes: the error says so and what fine-tuning needs
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "class sub-folder" in proc.stderr and str(photo_dir) in proc.stderr
    proc = run_cli("finetune", "--config", "fashion-mnist-tiny", "batch_size=7", check=False)
    assert proc.returncode == 2 and "even micro-batch" in proc.stderr


def test_posterize_zero_bits_is_black():
    from PIL import Image

    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert np.asarray(posterize(img, 0)).max() == 0
    assert np.asarray(posterize(img, 8)).tolist() == np.asarray(img).tolist()
    assert np.asarray(posterize(img, 1))[0, 0].tolist() == [128, 0, 0]


# ------------------------------------------------------------------------------ MAE framework:
# timm's ViT
def test_finetune_from_an_mae_checkpoint(mae_run, class_tree, tmp_path):
    proc = finetune(mae_run, class_tree, tmp_path / "ft", "--max-steps", "2")
    # MAE's protocol with mean pooling: the pre-trained final norm gives way to a new fc_norm
    assert (
        "new keys ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']; "
        "pre-trained keys not used ['norm.bias', 'norm.weight']"
    ) in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["classes"] == 3 and summary["val_images"] == 12
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "ft"))
    assert ckpt["kind"] == "finetune" and ckpt["timm_model"] == "vit_base_patch16_224"
    kw = ckpt["timm_kwargs"]
    assert kw["class_token"] and kw["num_classes"] == 3 and kw["global_pool"] == "avg"
    assert not any("rel_pos" in k for k in kw) and "init_values" not in kw
    # every encoder weight was trained, the position embedding included (fixed in pre-training)
    pre = load_checkpoint(latest_checkpoint(mae_run))["model"]
    assert not torch.equal(ckpt["model"]["pos_embed"], pre["encoder.pos_embed"])


def test_mae_finetune_model_starts_as_the_pretrained_encoder(mae_run):
    from timm.optim import param_groups_layer_decay

    student = student_from_checkpoint(load_checkpoint(latest_checkpoint(mae_run))).eval()
    overrides = parse_overrides(["global_pool=token", "drop_path=0", "rel_pos_init=shared_only"])
    cfg = load_config("fashion-mnist-tiny", overrides, kind="finetune")
    model, kwargs, report = build_model(
        cfg, 3, student, "x"
    )  # rel_pos_init does not apply to a ViT
    assert type(model).__name__ == "VisionTransformer" and kwargs["drop_path_rate"] == 0
    assert report["new"] == ["head.bias", "head.weight"] and report["dropped"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), student.encoder.forward_features(x))
    assert model.pos_embed.requires_grad and not student.encoder.pos_embed.requires_grad
    # layer-wise decay: pos_embed and cls_token in the stem group (smallest scale), without
    # weight decay
    groups = param_groups_layer_decay(
        model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75
    )
    stem = min(groups, key=lambda g: g["lr_scale"])
    assert len({g["lr_scale"] for g in groups}) == 4  # stem, 2 blocks, head
    assert any(
        p is model.pos_embed
        for g in groups
        if g["lr_scale"] == stem["lr_scale"] and g["weight_decay"] == 0
        for p in g["params"]
    )

    # another input size: the position embedding is resampled to the new grid (the class token's
    # row kept)
    cfg = load_config("fashion-mnist-tiny", parse_overrides(["img_size=48"]), kind="finetune")
    model, kwargs, report = build_model(cfg, 3, student, "x")
    assert kwargs["img_size"] == 48 and model.pos_embed.shape == (1, 1 + 12 * 12, student.embed_dim)
    assert torch.equal(model.pos_embed[:, :1], student.encoder.pos_embed[:, :1])
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    assert report["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)
