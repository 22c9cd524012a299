"""The DTM student as the release builds it: initialisation (models/modeling_dtm.py), relative
position bias layouts, and pre-training weight decay (utils/optim_factory.py), each against an
independent formulation of the release's rule."""

import math

import pytest
import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from tokenmorph.models import create_student, timm_encoder_kwargs
from tokenmorph.recipes.config import EngineConfig
from tokenmorph.runtime.optim import OptimizerStep

from .test_release_layouts import release_index


def truncated_std(std: float, cut: float) -> float:
    """The std of N(0, std^2) truncated to [-cut * std, cut * std]: std * sqrt(1 - 2 c phi(c) /
    (2 Phi(c) - 1))."""
    phi = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return std * math.sqrt(1 - 2 * cut * phi / mass)


RELEASE_STD = truncated_std(0.02, 1.0)  # 0.010792...


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_student("small", target_dim=512, drop_path_rate=0.0)


def test_release_effective_std_is_about_0_0108():
    assert abs(RELEASE_STD - 0.01079) < 1e-5


def test_release_init_statistics(small):
    """Every Linear (qkv, fc1, head; proj and fc2 before rescaling) and the patch-embedding conv:
    values within +-0.02 with the truncated normal's std and mean 0; biases 0."""
    enc = small.encoder
    plain = [small.head.weight, enc.patch_embed.proj.weight]
    for blk in enc.blocks:
        plain += [blk.attn.qkv.weight, blk.mlp.fc1.weight]
    values = torch.cat([w.detach().flatten() for w in plain])
    assert values.abs().max() <= 0.02 + 1e-7 and values.abs().max() > 0.0199
    assert abs(float(values.std()) - RELEASE_STD) < 5e-5 and abs(float(values.mean())) < 5e-5
    # fix_init_weight: block l (1-based) has proj and fc2 divided by sqrt(2 l)
    for layer, blk in enumerate(enc.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            scale = math.sqrt(2 * layer)
            w = w.detach()
            assert float(w.abs().max()) <= 0.02 / scale + 1e-7
            assert abs(float(w.std()) * scale - RELEASE_STD) < 4e-4
    for t in (enc.cls_token.detach(), small.mask_token.detach()):
        assert float(t.abs().max()) <= 0.02 and float(t.std()) > 0.005
    for name, p in small.named_parameters():
        if name.endswith(".bias") or "q_bias" in name or "v_bias" in name:
            assert not p.any(), name  # conv, linear, LayerNorm and q/v biases
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif "gamma" in name:
            assert torch.allclose(p, torch.full_like(p, 0.1)), name
        elif "relative_position_bias_table" in name:
            assert not p.any(), name


def test_release_init_is_narrower_than_timms():
    torch.manual_seed(0)
    timm_init = create_student("small", target_dim=512, init="timm")
    w = timm_init.encoder.blocks[0].attn.qkv.weight.detach()
    assert abs(float(w.std()) / RELEASE_STD - 1.85) < 0.05  # timm's cut at +-2 (absolute)


def test_timm_init_with_a_shared_table_is_the_former_student_bit_for_bit():
    """init=timm rel_pos=shared builds what the student built before the release's init and
    layouts existed: timm's Beit, then the mask token and the head drawn with timm's
    trunc_normal_ (std 0.02, cut at +-2)."""
    arch = dict(
        framework="beit",
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=2,
        num_heads=3,
        init_values=0.1,
    )
    torch.manual_seed(3)
    enc = Beit(**timm_encoder_kwargs(arch, rel_pos="shared", num_classes=0, global_pool=""))
    mask_token = torch.zeros(1, 1, 192)
    trunc_normal_(mask_token, std=0.02)
    head = nn.Linear(192, 16)
    trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    torch.manual_seed(3)
    student = create_student(
        "tiny", target_dim=16, img_size=32, patch_size=4, depth=2, rel_pos="shared", init="timm"
    )
    ours = student.state_dict()
    expected = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    expected.update({"mask_token": mask_token, "head.weight": head.weight, "head.bias": head.bias})
    assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.parametrize("rel_pos", ["both", "shared", "per_block"])
def test_relative_position_layouts_match_the_release_forward(rel_pos):
    """The release's attention (modeling_finetune.Attention): logits = (q * scale) k^T + the
    block's own table[index] + the shared table[index], then softmax; computed here by hand for
    block 0 and compared with the student's encoder block."""
    torch.manual_seed(1)
    student = create_student(
        "tiny", target_dim=8, img_size=32, patch_size=4, depth=1, rel_pos=rel_pos
    ).eval()
    enc = student.encoder
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    blk, heads = enc.blocks[0], 3
    x = torch.randn(2, 65, 192)
    idx = release_index(8)
    with torch.no_grad():
        h = blk.norm1(x)
        bias = torch.cat([blk.attn.q_bias, torch.zeros_like(blk.attn.v_bias), blk.attn.v_bias])
        q, k, v = (
            (h @ blk.attn.qkv.weight.t() + bias).view(2, 65, 3, heads, 64).permute(2, 0, 3, 1, 4)
        )
        logits = (q * 64**-0.5) @ k.transpose(-1, -2)
        for table in (
            getattr(blk.attn, "relative_position_bias_table", None),
            enc.rel_pos_bias.relative_position_bias_table if enc.rel_pos_bias is not None else None,
        ):
            if table is not None:
                logits = logits + table[idx.view(-1)].view(65, 65, heads).permute(2, 0, 1)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 65, 192)
        expected = x + blk.gamma_1 * blk.attn.proj(out)
        shared = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        got = x + blk.gamma_1 * blk.attn(blk.norm1(x), shared_rel_pos_bias=shared)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (enc.rel_pos_bias is not None) == (rel_pos != "per_block")
    assert (blk.attn.relative_position_bias_table is not None) == (rel_pos != "shared")


def test_pretraining_weight_decay_is_the_releases():
    """optim_factory.get_parameter_groups: no decay for 1-D parameters, names ending in .bias
    and the skip list {pos_embed, cls_token}; the mask token and every relative position table
    (shared and per block) are decayed."""
    torch.manual_seed(0)
    student = create_student("tiny", target_dim=8, img_size=32, patch_size=4, depth=2)
    cfg = EngineConfig(weight_decay=0.05)
    groups = OptimizerStep(cfg, student, 10, 10).optimizer.param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in student.named_parameters():
        release_name = name.removeprefix("encoder.")
        exempt = p.ndim <= 1 or name.endswith(".bias") or release_name in ("pos_embed", "cls_token")
        assert (id(p) in decayed) == (not exempt), name
    enc = student.encoder
    for p in (
        student.mask_token,
        enc.rel_pos_bias.relative_position_bias_table,
        enc.blocks[1].attn.relative_position_bias_table,
    ):
        assert id(p) in decayed
    assert id(enc.cls_token) not in decayed
