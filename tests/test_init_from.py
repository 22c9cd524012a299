"""init_from: a student starts from weights in every layout tokenmorph reads. Each file is
written here by an independent formulation (timm's own save_for_hf, the DTM release's renaming
of tests/test_release_layouts.py, MAE's autoencoder of tests/mae_reference.py, the export read
back with safetensors), and the student's tensors are compared with the file's, entry by
entry."""

import json

import pytest
import torch
import torch.nn.functional as F

from tokenmorph.errors import CheckpointError
from tokenmorph.hub.init_from import init_student
from tokenmorph.models import create_mae_student, create_student

from .helpers import final_weights, read_metrics, run_main, smoke_args
from .mae_reference import ReferenceMAE
from .test_release_layouts import random_student, release_state, save_release


def _beit_student(rel_pos="both", img_size=32, target_dim=24):
    torch.manual_seed(7)
    return create_student(
        "tiny", target_dim=target_dim, img_size=img_size, patch_size=4, depth=2, rel_pos=rel_pos
    )


def _mae_student(img_size=32, **kw):
    defaults = dict(target_dim=48, img_size=img_size, patch_size=4, depth=2, decoder_depth=1)
    return create_mae_student("tiny", **defaults | dict(decoder_dim=64, decoder_heads=2) | kw)


def _timm_folder(tmp_path, name, **kwargs):
    """A timm hub folder written by timm itself (``save_for_hf``), of a random model."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(3)
    model = timm.create_model(name, num_classes=0, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    folder = tmp_path / name
    save_for_hf(model, folder, safe_serialization=True)
    return model, folder


def _bicubic_pos_embed(table, side):
    """An absolute position table (1, 1 + n * n, D) resampled to side x side by bicubic
    interpolation of its grid (the class row kept): fine-tuning's rule, written out."""
    cls, grid = table[:, :1], table[:, 1:]
    n = int(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


def test_a_timm_beit_folder_starts_a_beit_student_with_its_tables_converted(tmp_path):
    """timm's per-block Beit into a "both" student: every weight equal, each block's own table
    the file's and the shared one zero (the same function); into a per-block student: equal."""
    model, folder = _timm_folder(
        tmp_path, "beit_base_patch16_224", img_size=32, patch_size=4, embed_dim=192, depth=2,
        num_heads=3, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
        global_pool="",
    )  # fmt: skip
    theirs = model.state_dict()
    for rel_pos in ("both", "per_block"):
        student = _beit_student(rel_pos)
        mask_before = student.mask_token.clone()
        note = init_student(student, f"local-dir:{folder}")
        own = student.encoder.state_dict()
        for k, v in theirs.items():
            assert torch.equal(own[k], v), k
        if rel_pos == "both":
            assert "relative position tables per_block -> both" in note
            assert not own["rel_pos_bias.relative_position_bias_table"].any()
        assert "mask token, prediction layer initialised fresh" in note
        assert torch.equal(student.mask_token, mask_before)
    # the same folder as a bare path, and through timm:
    assert "timm Beit" in init_student(_beit_student(), str(folder))
    assert "timm Beit" in init_student(_beit_student(), f"timm:local-dir:{folder}")


def test_a_timm_vit_of_another_grid_is_resampled_as_fine_tuning_does(tmp_path):
    """A 64 px ViT (16 x 16 grid) into a 32 px MAE student (8 x 8): the position table is the
    bicubic resampling of the file's, every other tensor equal."""
    model, folder = _timm_folder(
        tmp_path, "vit_tiny_patch16_224", img_size=64, patch_size=4, depth=2, global_pool="token"
    )
    student = _mae_student()
    note = init_student(student, f"timm:local-dir:{folder}")
    assert "resampled to the student's grid: encoder.pos_embed" in note
    assert "decoder and mask token initialised fresh" in note
    own = student.encoder.state_dict()
    for k, v in model.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(own[k], v), k
    expected = _bicubic_pos_embed(model.pos_embed.detach(), 8)
    torch.testing.assert_close(own["pos_embed"], expected, atol=1e-6, rtol=1e-5)


def test_a_dtm_release_checkpoint_starts_a_student_in_any_layout(tmp_path):
    source = random_student("both", seed=4, img_size=32, patch_size=4, depth=2)
    path = save_release(tmp_path / "checkpoint-299.pth", release_state(source))
    for spec in (str(path), f"dtm-release:{path}"):
        student = _beit_student("both")
        note = init_student(student, spec)
        for k, v in source.state_dict().items():
            assert torch.equal(student.state_dict()[k], v), k
        assert "initialised fresh" not in note
    per_block = _beit_student("per_block")
    init_student(per_block, str(path))
    shared = source.encoder.rel_pos_bias.relative_position_bias_table
    for i, blk in enumerate(source.encoder.blocks):
        table = per_block.encoder.blocks[i].attn.relative_position_bias_table
        assert torch.equal(table, blk.attn.relative_position_bias_table + shared)
    # another teacher: the head does not fit; the encoder is loaded, the head starts fresh
    other = _beit_student("both", target_dim=16)
    head = other.head.weight.clone()
    assert "prediction layer head.weight (24, 192) vs (16, 192)" in init_student(other, str(path))
    assert torch.equal(other.head.weight, head)
    assert torch.equal(other.encoder.norm.weight, source.encoder.norm.weight)


def test_a_dtm_release_of_another_grid_resamples_the_bias_tables(tmp_path):
    source = random_student("both", seed=5, img_size=48, patch_size=4, depth=2)
    path = save_release(tmp_path / "big.pth", release_state(source))
    student = _beit_student("both")
    note = init_student(student, str(path))
    assert "resampled to the student's grid" in note and "relative_position_bias_table" in note
    table = student.encoder.rel_pos_bias.relative_position_bias_table
    assert table.shape == (15 * 15 + 3, 3)
    src = source.encoder.rel_pos_bias.relative_position_bias_table.detach()
    assert torch.equal(table[-3:], src[-3:])  # the class-token entries are kept


def test_an_official_mae_checkpoint_of_another_grid(tmp_path):
    ref = ReferenceMAE(img=64, seed=6)
    path = ref.save(tmp_path / "mae_visualize.pth")
    student = _mae_student()
    note = init_student(student, str(path))
    assert "MAE visualize layout" in note and "decoder_pos_embed" in note
    own = student.state_dict()
    for k, v in ref.state_dict().items():
        ours = k if k.startswith("decoder") or k == "mask_token" else f"encoder.{k}"
        if k.endswith("pos_embed"):
            torch.testing.assert_close(own[ours], _bicubic_pos_embed(v, 8), atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(own[ours], v), k


def test_strictness_names_the_keys_and_init_strict_false_loads_what_fits(tmp_path):
    ref = ReferenceMAE(depth=3, seed=1)
    path = ref.save(tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[encoder.blocks.2.*init_strict"):
        init_student(_mae_student(), str(path))
    student = _mae_student()
    note = init_student(student, str(path), strict=False)
    assert "init_strict=false" in note and "ignored [encoder.blocks.2" in note
    assert torch.equal(student.encoder.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    shallow = ReferenceMAE(depth=1, seed=1).save(tmp_path / "shallow.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[encoder.blocks.1"):
        init_student(_mae_student(), str(shallow))
    with pytest.raises(CheckpointError, match="framework=mae student's weights.*framework=beit"):
        init_student(_beit_student(), str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        init_student(_beit_student(), str(tmp_path / "nothing.pth"))
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2)}}, junk)
    with pytest.raises(CheckpointError, match="not a layout tokenmorph reads"):
        init_student(_beit_student(), str(junk))


def test_a_smoke_run_starts_from_another_runs_export_and_run_folder(photo_dir, tmp_path, capsys):
    """The issue's end-to-end check: run A, its export; run B with init_from=the export and lr 0
    holds exactly the export's tensors after its step (read back with safetensors, not through
    tokenmorph); init_from=A's run folder gives A's whole student (head included)."""
    from safetensors.torch import load_file

    a = tmp_path / "a"
    status, _, err = run_main(capsys, *smoke_args(photo_dir, a, "--max-steps", "2"))
    assert status == 0, err
    export = tmp_path / "a.safetensors"
    status, _, err = run_main(capsys, "export", a, export)
    assert status == 0, err
    frozen = ("lr=0", "min_lr=0", "weight_decay=0", "--max-steps", "1")
    b = tmp_path / "b"
    status, out, err = run_main(capsys, *smoke_args(photo_dir, b, f"init_from={export}", *frozen))
    assert status == 0, err
    assert "initialised from" in out and "tokenmorph export" in out
    weights = final_weights(b)["model"]
    exported = load_file(str(export))
    for k, v in exported.items():
        if k.endswith("attn.relative_position_bias_table"):  # own + shared = the export's table
            shared = weights["encoder.rel_pos_bias.relative_position_bias_table"]
            assert torch.equal(weights[f"encoder.{k}"] + shared, v), k
        else:
            assert torch.equal(weights[f"encoder.{k}"], v), k
    c = tmp_path / "c"
    status, out, err = run_main(capsys, *smoke_args(photo_dir, c, f"init_from={a}", *frozen))
    assert status == 0, err
    source = final_weights(a)["model"]
    for k, v in final_weights(c)["model"].items():
        assert torch.equal(v, source[k]), k
    assert json.loads((c / "summary.json").read_text())["steps"] == 1
    assert read_metrics(c)[-1]["step"] == 1
    status, _, err = run_main(
        capsys, *smoke_args(photo_dir, tmp_path / "d", f"init_from={tmp_path / 'missing.pth'}")
    )
    assert status == 2 and "does not exist" in err and "Traceback" not in err
