"""``tokenmorph export``: the student encoder as a timm checkpoint that loads strictly and gives
   the
same features as tokenmorph's encoder.

Strictness is checked here, not taken from timm: every ``load_state_dict`` call during
``timm.create_model`` is intercepted, and the test asserts one strict call with no missing or
unexpected keys, the file's key set equal to the model's, and every tensor loaded unchanged.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenmorph.data import sample_photo
from tokenmorph.errors import TokenmorphError
from tokenmorph.hub.export import export_encoder
from tokenmorph.models import create_student, student_from_checkpoint
from tokenmorph.runtime.checkpoints import CHECKPOINT_FORMAT

from .helpers import run_cli, smoke_args

PHOTOS = ("astronaut", "coffee", "chelsea")
SMOKE_ARCH = dict(img_size=32, patch_size=4, depth=2)  # the smoke config's student geometry
STATS = dict(
    mean=[0.3, 0.4, 0.5], std=[0.2, 0.25, 0.3]
)  # not ImageNet's, so a lost normalisation shows


def write_checkpoint(path, size="tiny", kind="pretrain", step=3, stats=STATS, **arch):
    """A checkpoint in the engine's format (the fields export reads), from a freshly built
    student with random (non-zero) relative position tables, so that a wrong merge of a block's
    own and the shared table shows; returns (path, student)."""
    torch.manual_seed(0)
    student = create_student(size, target_dim=16, drop_path_rate=0.0, **stats, **arch)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "step": step,
            "world_size": 1,
            "config": {},
            "compat": {"model": size, "teacher": "pixels", "target_dim": 16, "framework": "beit"},
            "model": student.state_dict(),
            "student_arch": student.arch,
            "student_size": size,
            "target_dim": 16,
            "data_stats": stats,
        },
        path,
    )
    return path, student.eval()


@contextmanager
def recorded_loads():
    """Records (strict, result) of every ``nn.Module.load_state_dict`` call made inside the
    block."""
    calls = []
    original = torch.nn.Module.load_state_dict

    def spy(self, state_dict, strict=True, **kw):
        result = original(self, state_dict, strict=strict, **kw)
        calls.append((strict, result))
        return result

    torch.nn.Module.load_state_dict = spy
    try:
        yield calls
    finally:
        torch.nn.Module.load_state_dict = original


def load_with_timm(json_path, **extra):
    """The documented call; returns (model, the recorded load_state_dict calls)."""
    import timm

    spec = json.loads(Path(json_path).read_text())
    weights = Path(spec["weights"])  # absolute: the recipe works from any folder
    with recorded_loads() as calls:
        model = timm.create_model(
            spec["timm_model"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(weights)),
            **{**spec["kwargs"], **extra},
        )
    return model.eval(), calls


def assert_strict_exact(model, calls, weights):
    assert len(calls) == 1
    strict, result = calls[0]
    assert strict is True and not result.missing_keys and not result.unexpected_keys
    saved = load_file(str(weights))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)


def photos(side):
    return torch.stack([sample_photo(name, side) for name in PHOTOS])


def assert_same_features(model, student, spec):
    """timm on photos normalised with the export's mean/std == tokenmorph's encoder on the raw
    photos."""
    x = photos(spec["img_size"])
    mean, std = (
        torch.tensor(spec["mean"]).view(1, 3, 1, 1),
        torch.tensor(spec["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        ours = student.forward_features(x)
        theirs = model.forward_features((x - mean) / std)
    assert theirs.shape == ours.shape == (len(PHOTOS), 1 + student.num_patches, student.embed_dim)
    assert (theirs - ours).abs().max().item() < 1e-4
    return ours, (x - mean) / std


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("smoke") / "checkpoints" / "step_00000003.pt", **SMOKE_ARCH
    )[0]


@pytest.mark.parametrize("pool", ["avg", "token", ""])
def test_smoke_geometry_loads_strictly_with_same_features(smoke_ckpt, tmp_path, pool):
    weights, json_path = export_encoder(smoke_ckpt, tmp_path / "enc.safetensors", global_pool=pool)
    assert json_path == tmp_path / "enc.json"
    spec = json.loads(json_path.read_text())
    assert spec["kwargs"]["global_pool"] == pool and spec["kwargs"]["num_classes"] == 0
    assert (spec["img_size"], spec["patch_size"], spec["depth"], spec["step"]) == (32, 4, 2, 3)
    model, calls = load_with_timm(json_path)
    assert_strict_exact(model, calls, weights)
    student = student_from_checkpoint(torch.load(smoke_ckpt, weights_only=False)).eval()
    tokens, x = assert_same_features(model, student, spec)
    # the final norm stays on the tokens whatever the pooling: the pooled feature is a pooling of
    # them
    with torch.no_grad():
        pooled = model(x)
    expected = {"avg": tokens[:, 1:].mean(1), "token": tokens[:, 0], "": tokens}[pool]
    assert (pooled - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("rel_pos", ["both", "shared", "per_block"])
def test_relative_position_layouts_export_the_same_function(rel_pos, tmp_path):
    """A "both" student (the default) exports one table per block = its own + the shared one,
    a per-block-only timm Beit computing the same function; "shared" keeps its one shared table
    (as before the per-block tables existed) and "per_block" its own."""
    ckpt, student = write_checkpoint(tmp_path / "ckpt.pt", rel_pos=rel_pos, **SMOKE_ARCH)
    weights, json_path = export_encoder(ckpt, tmp_path / "enc.safetensors", global_pool="")
    spec, saved = json.loads(json_path.read_text()), load_file(str(weights))
    per_block = rel_pos != "shared"
    assert spec["kwargs"]["use_rel_pos_bias"] == per_block
    assert spec["kwargs"]["use_shared_rel_pos_bias"] == (not per_block)
    enc = student.encoder
    for i, blk in enumerate(enc.blocks):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        if rel_pos == "both":
            expected = (
                blk.attn.relative_position_bias_table
                + enc.rel_pos_bias.relative_position_bias_table
            )
            assert torch.equal(saved[key], expected)
        assert (key in saved) == per_block
    assert ("rel_pos_bias.relative_position_bias_table" in saved) == (not per_block)
    model, calls = load_with_timm(json_path)
    assert_strict_exact(model, calls, weights)
    assert_same_features(model, student, spec)


def test_export_carries_the_data_config(smoke_ckpt, tmp_path):
    import timm.data

    _, json_path = export_encoder(smoke_ckpt, tmp_path / "enc.safetensors")
    model, _ = load_with_timm(json_path)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert np.allclose(cfg["mean"], STATS["mean"]) and np.allclose(cfg["std"], STATS["std"])
    assert tuple(cfg["input_size"]) == (3, 32, 32)


def test_finetune_kwargs_add_a_head_and_load_everything_else(smoke_ckpt, tmp_path):
    _, json_path = export_encoder(smoke_ckpt, tmp_path / "enc.safetensors")
    model, calls = load_with_timm(json_path, num_classes=10, drop_path_rate=0.1)
    ((strict, result),) = calls
    assert (
        sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    )
    assert model(photos(32)).shape == (len(PHOTOS), 10)


@pytest.mark.parametrize(
    "size", ["tiny", "small", "base", pytest.param("large", marks=pytest.mark.slow)]
)
def test_every_size_at_patch_16_loads_strictly(size, tmp_path):
    ckpt, student = write_checkpoint(
        tmp_path / "ckpt.pt", size=size, stats={}
    )  # no data stats: ImageNet's
    weights, json_path = export_encoder(ckpt, tmp_path / "enc.safetensors")
    spec = json.loads(json_path.read_text())
    assert spec["timm_model"] == (
        "beit_large_patch16_224" if size == "large" else "beit_base_patch16_224"
    )
    assert np.allclose(spec["mean"], (0.485, 0.456, 0.406))
    model, calls = load_with_timm(json_path)
    assert_strict_exact(model, calls, weights)
    if (
        size == "tiny"
    ):  # the same forward for every width and depth; the big ones would dominate the suite
        assert_same_features(model, student, spec)


def test_cli_exports_the_newest_checkpoint_of_a_run_folder(tmp_path, capsys):
    from tokenmorph.cli import main

    run = tmp_path / "run"
    for step in (2, 10):
        write_checkpoint(run / "checkpoints" / f"step_{step:08d}.pt", step=step, **SMOKE_ARCH)
    assert (
        main(
            ["export", str(run), str(tmp_path / "out" / "enc.safetensors"), "--global-pool", "none"]
        )
        == 0
    )
    summary, call = capsys.readouterr().out.strip().splitlines()
    assert (
        "step 10" in summary
        and "global_pool=''" in summary
        and call.startswith("timm.create_model(")
    )
    spec = json.loads((tmp_path / "out" / "enc.json").read_text())
    assert spec["step"] == 10 and spec["source_checkpoint"].endswith("step_00000010.pt")
    assert spec["kwargs"]["global_pool"] == ""


def test_errors_are_one_line(tmp_path, capsys):
    from tokenmorph.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    finetune, _ = write_checkpoint(tmp_path / "ft.pt", kind="finetune", **SMOKE_ARCH)
    damaged, _ = write_checkpoint(tmp_path / "damaged.pt", **SMOKE_ARCH)
    ckpt = torch.load(damaged, weights_only=False)
    del ckpt["model"]["encoder.norm.weight"]
    torch.save(ckpt, damaged)
    cases = [
        (tmp_path / "missing", "no checkpoint found"),
        (tmp_path, "no checkpoint found"),  # a folder without checkpoints/
        (text, "not a readable checkpoint"),
        (finetune, "'finetune' checkpoint"),
        (damaged, "differing: norm.weight"),
    ]
    for src, message in cases:
        assert main(["export", str(src), str(tmp_path / "enc.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tokenmorph: error:") and message in err, err
    with pytest.raises(TokenmorphError, match=r"\.safetensors"):
        export_encoder(finetune, tmp_path / "enc.pt")
    assert not (tmp_path / "enc.safetensors").exists()


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Ten real photo crops from scikit-image, as PNG files."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k in range(10):
        img = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
        h, w = img.shape[:2]
        s = int(rng.integers(64, min(h, w)))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        Image.fromarray(img[y : y + s, x : x + s]).save(root / f"img_{k:02d}.png")
    return root


def test_end_to_end_pretrain_export_timm(photo_dir, tmp_path):
    """pretrain (smoke, 2 steps) -> export of the run folder -> the printed timm call, strict,
       same
    features."""
    import timm

    out = tmp_path / "run"
    run_cli(
        *smoke_args(str(photo_dir), str(out)),
        "--max-steps",
        "2",
    )
    proc = run_cli("export", str(out), str(out / "enc.safetensors"))
    summary, call = proc.stdout.strip().splitlines()
    assert "step 2" in summary and call.startswith("timm.create_model(")
    spec = json.loads((out / "enc.json").read_text())
    ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert (
        spec["source_checkpoint"].endswith("step_00000002.pt")
        and spec["mean"] == ckpt["data_stats"]["mean"]
    )
    # the printed line itself, run as a user would paste it
    with recorded_loads() as calls:
        model = eval(call, {"timm": timm, "json": json}).eval()
    assert_strict_exact(model, calls, out / "enc.safetensors")
    assert_same_features(model, student_from_checkpoint(ckpt).eval(), spec)


# ------------------------------------------------------------------------------ MAE framework:
# timm's ViT
@pytest.mark.parametrize("pool", ["avg", "token", ""])
def test_mae_export_is_a_timm_vit_that_loads_strictly_with_the_same_features(
    mae_run, tmp_path, pool
):
    weights, json_path = export_encoder(mae_run, tmp_path / "enc.safetensors", global_pool=pool)
    spec = json.loads(json_path.read_text())
    ckpt = torch.load(mae_run / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert ckpt["student_arch"]["framework"] == "mae"
    assert spec["timm_model"] == "vit_base_patch16_224" and spec["framework"] == "mae"
    kw = spec["kwargs"]
    assert (
        kw["img_size"],
        kw["patch_size"],
        kw["depth"],
        kw["class_token"],
        kw["global_pool"],
        kw["num_classes"],
    ) == (32, 4, 2, True, pool, 0)
    assert ("fc_norm" in kw) == (pool == "avg") and kw.get("fc_norm") in (False, None)
    assert "init_values" not in kw and not any("rel_pos" in k for k in kw)
    assert kw["pretrained_cfg"]["description"].startswith(
        "tokenmorph mae tiny student encoder, step 2"
    )
    # the encoder only: exactly the checkpoint's "encoder." weights, no decoder
    assert set(load_file(str(weights))) == {
        k[len("encoder.") :] for k in ckpt["model"] if k.startswith("encoder.")
    }
    model, calls = load_with_timm(json_path)
    assert type(model).__name__ == "VisionTransformer"
    assert_strict_exact(model, calls, weights)
    student = student_from_checkpoint(ckpt).eval()
    tokens, x = assert_same_features(model, student, spec)
    with torch.no_grad():
        # bit-identical to tokenmorph's encoder (timm's own forward on the same normalised input)
        assert torch.equal(model.forward_features(x), student.encoder.forward_features(x))
        pooled = model(x)
    expected = {"avg": tokens[:, 1:].mean(1), "token": tokens[:, 0], "": tokens}[pool]
    assert (pooled - expected).abs().max().item() < 1e-5


def test_mae_export_for_finetuning_and_damaged_weights(mae_run, tmp_path, capsys):
    from tokenmorph.cli import main

    assert main(["export", str(mae_run), str(tmp_path / "enc.safetensors")]) == 0
    assert "the tiny mae encoder" in capsys.readouterr().out
    model, calls = load_with_timm(tmp_path / "enc.json", num_classes=10)
    ((strict, result),) = calls
    assert (
        sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    )
    assert model(photos(32)).shape == (len(PHOTOS), 10)
    damaged = tmp_path / "damaged.pt"
    ckpt = torch.load(mae_run / "checkpoints" / "step_00000002.pt", weights_only=False)
    del ckpt["model"]["encoder.pos_embed"]
    torch.save(ckpt, damaged)
    assert main(["export", str(damaged), str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "the VisionTransformer that timm" in err
        and "differing: pos_embed" in err
    ), err


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_mae_recipe_of_every_size_matches_the_encoder(size, tmp_path):
    """Keys and shapes of an MAE student's encoder (built on the meta device: no memory) == the
    recipe's ViT."""
    from timm.models.vision_transformer import VisionTransformer

    from tokenmorph.hub.export import _check_loadable, timm_spec
    from tokenmorph.models import STUDENT_SIZES, timm_encoder_kwargs

    d, L, h = STUDENT_SIZES[size]
    arch = dict(
        framework="mae",
        img_size=224,
        patch_size=16,
        embed_dim=d,
        depth=L,
        num_heads=h,
        decoder_depth=4,
        decoder_dim=384,
        decoder_heads=12,
    )
    with torch.device("meta"):
        state = VisionTransformer(
            **timm_encoder_kwargs(arch, num_classes=0, global_pool="")
        ).state_dict()
    for pool in ("avg", "token", ""):
        name, kwargs = timm_spec(arch, pool, (0.5,) * 3, (0.5,) * 3)
        assert name == ("vit_large_patch16_224" if size == "large" else "vit_base_patch16_224")
        _check_loadable(
            name, json.loads(json.dumps(kwargs)), state, tmp_path
        )  # raises on any difference
