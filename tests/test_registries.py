"""The registries are the single source of the config's choices, its validation and the help
texts."""

from dataclasses import fields

import pytest

from tokenmorph.commands import COMMANDS
from tokenmorph.data.transforms import INTERPOLATIONS
from tokenmorph.errors import ConfigError
from tokenmorph.eval import PROTOCOLS
from tokenmorph.models.arch import DECODER_PRESETS, FRAMEWORKS, REL_POS, STUDENT_SIZES
from tokenmorph.models.layouts import REL_POS_INITS
from tokenmorph.models.student import STUDENT_INITS
from tokenmorph.models.teachers import TEACHER_NAMES, TEACHERS, describe_teachers
from tokenmorph.ops.degrade import DEGRADATIONS, build_degradation
from tokenmorph.ops.losses import DISTANCES, SCHEDULERS, token_distance
from tokenmorph.ops.morph import MODES
from tokenmorph.ops.patches import PIXEL_NORMS
from tokenmorph.recipes.config import (
    FinetuneConfig,
    PretrainConfig,
    describe_keys,
    load_config,
    masks_input,
)
from tokenmorph.runtime.optim import LR_SCALING, LR_SCHEDULES
from tokenmorph.runtime.precision import PRECISIONS


def choices(cls, key):
    return tuple({f.name: f for f in fields(cls)}[key].metadata["choices"])


@pytest.mark.parametrize(
    "key,registry",
    [
        ("objective", DEGRADATIONS),
        ("distance", DISTANCES),
        ("scheduler", SCHEDULERS),
        ("morph_mode", MODES),
        ("model", STUDENT_SIZES),
        ("framework", FRAMEWORKS),
        ("decoder", DECODER_PRESETS),
        ("pixel_norm", PIXEL_NORMS),
        ("precision", PRECISIONS),
        ("lr_scaling", LR_SCALING),
        ("rel_pos_bias", REL_POS),
        ("init", STUDENT_INITS),
        ("crop_interpolation", INTERPOLATIONS),
        ("lr_schedule", LR_SCHEDULES),
    ],
)
def test_pretrain_choices_are_the_registries(key, registry):
    assert choices(PretrainConfig, key) == tuple(registry)


def test_finetune_choices_are_the_registries():
    assert choices(FinetuneConfig, "model") == tuple(STUDENT_SIZES)
    assert choices(FinetuneConfig, "rel_pos_init") == tuple(REL_POS_INITS)
    assert choices(FinetuneConfig, "lr_schedule") == tuple(LR_SCHEDULES)


def test_segment_choices_are_the_registries():
    from tokenmorph.models.segmentation import CLASSIFIER_INITS, REL_POS_RESIZE
    from tokenmorph.ops.segmentation import INFERENCE_MODES
    from tokenmorph.recipes.config import SegmentConfig
    from tokenmorph.runtime.optim import WEIGHT_DECAY_RULES

    assert choices(SegmentConfig, "model") == tuple(STUDENT_SIZES)
    assert choices(SegmentConfig, "rel_pos_init") == tuple(REL_POS_INITS)
    assert choices(SegmentConfig, "rel_pos_resize") == REL_POS_RESIZE
    assert choices(SegmentConfig, "classifier_init") == tuple(CLASSIFIER_INITS)
    assert choices(SegmentConfig, "eval_mode") == tuple(INFERENCE_MODES)
    assert choices(SegmentConfig, "weight_decay_rule") == tuple(WEIGHT_DECAY_RULES)
    assert choices(SegmentConfig, "lr_schedule") == tuple(LR_SCHEDULES)
    assert "weight_decay_rule" in describe_keys("segment")


def test_every_registered_component_is_accepted_and_described():
    keys = describe_keys("pretrain")
    for name in DEGRADATIONS:
        assert name in keys
        cfg = load_config("smoke", {"objective": name, "framework": "mae", "teacher": "pixels"})
        # which objectives mask their input comes from the degradation, not a list in the config
        assert masks_input(cfg) == build_degradation(name, 32, 4).masked
    for name in DISTANCES:
        assert token_distance(*[__import__("torch").ones(2, 3)] * 2, distance=name).shape == (2,)
    for name in TEACHERS:
        assert name in describe_teachers()
        assert load_config("smoke", {"teacher": name}).teacher == name
    assert all(n.split(":")[0] in describe_teachers() for n in TEACHER_NAMES)
    assert load_config("smoke", {"teacher": "timm:vit_small_patch16_224"}).teacher.startswith(
        "timm:"
    )
    with pytest.raises(ConfigError, match="teacher='clip' is not one of: clip-vit-b16"):
        load_config("smoke", {"teacher": "clip"})


def test_every_evaluation_protocol_is_a_command():
    registered = {name for group, name, _ in COMMANDS if group == "eval"}
    assert registered == set(PROTOCOLS)
    for group, name, module in COMMANDS:
        if group == "eval":  # a module name cannot hold a hyphen: seg-linear -> eval_seg_linear
            assert module == f"eval_{name.replace('-', '_')}"
