"""Checkpoints in the layout earlier tokenmorph versions wrote still load everywhere a backbone
is read."""

import random

import numpy as np
import torch

from tokenmorph.hub.backbone import load_backbone
from tokenmorph.hub.export import export_encoder
from tokenmorph.models import StudentRecord, create_student, student_from_checkpoint
from tokenmorph.runtime.checkpoints import load_checkpoint


def legacy_checkpoint(path, student):
    """The v1 layout written out by hand: no ``framework`` in ``student_arch``, the RNG states of
    the time (NumPy's and Python's included), optimiser state entries."""
    arch = {k: v for k, v in student.arch.items() if k != "framework"}
    ckpt = {
        "format": "tokenmorph-checkpoint-v1",
        "kind": "pretrain",
        "compat": {"model": "tiny", "teacher": "timm:vit_tiny_patch16_224", "framework": "beit"},
        "config": {"model": "tiny", "img_size": 32, "patch_size": 4},
        "step": 7,
        "world_size": 1,
        "images_seen": 56,
        "skipped_images": 0,
        "skipped_steps": 0,
        "model": student.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {},
        "scaler": {},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": None,
        },
        "student_arch": arch,
        "student_size": "tiny",
        "target_dim": 16,
        "data_stats": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    torch.save(ckpt, path)
    return ckpt


def test_a_v1_checkpoint_loads_as_backbone_student_and_export(tmp_path):
    torch.manual_seed(0)
    student = create_student(
        "tiny", target_dim=16, img_size=32, patch_size=4, depth=2, mean=(0.5,) * 3, std=(0.25,) * 3
    ).eval()
    path = tmp_path / "step_00000007.pt"
    ckpt = legacy_checkpoint(path, student)
    record = StudentRecord.from_checkpoint(ckpt)
    assert record.framework == "beit" and record.grid == (8, 8) and record.step == 7
    assert record.teacher == "timm:vit_tiny_patch16_224" and record.mean == (0.5, 0.5, 0.5)
    x = torch.rand(2, 3, 32, 32)
    # read with weights_only=True: the NumPy RNG state of the time passes the allow-list
    again = student_from_checkpoint(load_checkpoint(path)).eval()
    assert torch.equal(again(x), student(x))
    backbone = load_backbone(str(path))
    with torch.no_grad():
        expected = student.forward_features(x)[:, 0]
    torch.testing.assert_close(backbone.features(x, "cls"), expected)
    weights, spec = export_encoder(path, tmp_path / "enc.safetensors")
    assert weights.exists() and spec.exists()
