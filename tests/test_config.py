"""Configs: shipped files load, overrides are typed, every mistake is one clear line."""

import pytest

from tokenmorph.recipes.config import (
    ConfigError,
    PretrainConfig,
    config_names,
    load_config,
    parse_overrides,
)


def test_shipped_configs_load_and_validate():
    names = config_names()
    for required in (
        "smoke",
        "demo",
        "vit-s16-in1k",
        "vit-b16-in1k",
        "vit-l16-in1k",
        "vit-b16-in1k-release",
    ):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, PretrainConfig) and cfg.name == name


def test_paper_recipes():
    b = load_config("vit-b16-in1k")
    assert (
        b.model,
        b.epochs,
        b.batch_size,
        b.lr,
        b.warmup_epochs,
        b.weight_decay,
        b.clip_grad,
    ) == ("base", 300, 1024, 1.5e-4, 10, 0.05, 3.0)
    assert (b.beta1, b.beta2, b.num_masked, b.min_mask_block, b.num_levels, b.k_max, b.beta) == (
        0.9,
        0.98,
        75,
        16,
        2,
        14,
        2.0,
    )
    assert (
        load_config("vit-s16-in1k").model == "small"
        and load_config("vit-l16-in1k").model == "large"
    )
    r = load_config("vit-b16-in1k-release")
    assert (r.lr, r.lr_scaling, r.lr_base_batch, r.teacher_normalization) == (
        1.5e-3,
        "sqrt",
        2048,
        "imagenet",
    )


def test_dtm_recipes_choose_the_release_rows():
    """docs/fidelity.md's DTM rows: what the paper and release recipes (and the defaults) pick."""
    for name in ("vit-s16-in1k", "vit-b16-in1k", "vit-l16-in1k", "vit-b16-in1k-release", "smoke"):
        c = load_config(name)
        assert (c.rel_pos_bias, c.init, c.chunk_size, c.normalize_target) == (
            "both",
            "release",
            128,
            False,
        )
        assert c.color_jitter == 0.4 and c.scheduler == "release" and c.morph_mode == "reference"
    ft = load_config("vit-b16-in1k", kind="finetune")
    assert (ft.rel_pos_init, ft.layer_decay, ft.global_pool) == ("own_plus_shared", 0.6, "avg")
    assert load_config("vit-b16-in1k").crop_scale_min == 0.08


def test_overrides_are_typed():
    cfg = load_config(
        "smoke",
        parse_overrides(
            [
                "lr=3e-4",
                "hflip=false",
                "depth=none",
                "max_steps=5",
                'teacher_kwargs={"img_size": 32}',
                "epochs=2",
            ]
        ),
    )
    assert cfg.lr == 3e-4 and cfg.hflip is False and cfg.depth is None and cfg.max_steps == 5
    assert cfg.teacher_kwargs == {"img_size": 32} and cfg.epochs == 2.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("lrr=1", "unknown config key 'lrr' (did you mean lr"),
        ("lr=fast", "lr='fast' is not a valid float"),
        ("batch_size=8.5", "batch_size='8.5' is not a valid int"),
        ("model=huge", "model='huge' is not one of: tiny, small, base, large"),
        ("num_masked=100", "num_masked=100 exceeds the 64 patches"),
        ("patch_size=5", "img_size=32 is not a multiple of patch_size=5"),
        ("drop_path=2", "drop_path=2.0 is above its maximum 1.0"),
        ("n_max=65", "n_max=65 exceeds the 64 patches"),
        ("accum_steps=3", "batch_size=8 is not divisible by accum_steps x processes = 3 x 1"),
        ("hflip=maybe", "hflip='maybe' is not a valid bool"),
    ],
)
def test_bad_values_name_themselves(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", parse_overrides([override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="no pretrain config named 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nfoo: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'foo'.*bad.yaml"):
        load_config(str(bad))
    ok = tmp_path / "mine.yaml"
    ok.write_text("base: smoke\nlr: 0.01\n")
    cfg = load_config(str(ok))
    assert cfg.lr == 0.01 and cfg.model == "tiny" and cfg.name == "mine"
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["lr"])
