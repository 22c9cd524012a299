"""Frozen image encoders for evaluation: a tokenmorph checkpoint's student encoder, or any timm model.

``load_backbone(spec)`` accepts a checkpoint file, a run folder (its newest checkpoint), or
``timm:NAME``; the result turns [0, 1] images into pooled features or tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["Backbone", "load_backbone", "load_pretrain_checkpoint", "student_from_checkpoint",
           "encoder_kwargs_from_checkpoint"]

POOLS = ("cls", "mean")


@dataclass
class Backbone:
    """A frozen encoder with its input conventions.

    Attributes:
        name: where it came from (checkpoint path or ``timm:NAME``).
        model: a timm-style module with ``forward_features(x) -> (B, prefix + N, D)`` (or (B, D, h, w)).
        img_size: the input side it expects.
        mean, std: input normalisation (applied by :meth:`tokens`).
        num_prefix_tokens: CLS-like tokens before the patch tokens (0 for CNNs).
        embed_dim: D.
    """

    name: str
    model: nn.Module
    img_size: int
    mean: Sequence[float]
    std: Sequence[float]
    num_prefix_tokens: int
    embed_dim: int

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, prefix + N, D) tokens (a CNN map is flattened, no prefix)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        out = self.model.forward_features((images - mean) / std)
        if out.dim() == 4:
            out = out.flatten(2).transpose(1, 2)
        return out

    def features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D): the CLS token (``pool="cls"``; mean of patch tokens when the
        model has no CLS token) or the mean of the patch tokens (``pool="mean"``)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        t = self.tokens(images)
        if pool == "cls" and self.num_prefix_tokens > 0:
            return t[:, 0]
        return t[:, self.num_prefix_tokens:].mean(dim=1)


def load_pretrain_checkpoint(spec, purpose: str) -> tuple[dict, Path]:
    """(checkpoint, path) of a pre-training checkpoint file or run folder (its newest checkpoint); one-line
    errors for a missing path, another kind of checkpoint, or one without the student's architecture."""
    from .train import TrainingError, latest_checkpoint, load_checkpoint

    path = latest_checkpoint(Path(spec))
    if path is None:
        raise TrainingError(f"no checkpoint found at {spec}: give a checkpoint file or a run folder with checkpoints/")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "pretrain":
        raise TrainingError(f"{path} is a {ckpt.get('kind')!r} checkpoint; {purpose} needs a pre-training checkpoint "
                            f"(tokenmorph pretrain)")
    if "student_arch" not in ckpt:
        raise TrainingError(f"{path} has no student architecture record (student_arch); it was not written by "
                            f"tokenmorph pretrain")
    return ckpt, path


def encoder_kwargs_from_checkpoint(ckpt: dict) -> dict:
    """timm ``Beit`` keyword arguments that rebuild a checkpoint's student encoder exactly."""
    from .models import create_student, timm_beit_kwargs

    arch = ckpt.get("student_arch")
    if arch is None:
        raise ValueError("this checkpoint has no student architecture record (student_arch); it was not written "
                         "by tokenmorph pretrain")
    probe = create_student(ckpt.get("student_size", "tiny"), target_dim=1, img_size=arch["img_size"],
                           patch_size=arch["patch_size"], depth=arch["depth"], embed_dim=arch["embed_dim"],
                           num_heads=arch["num_heads"], init_values=arch["init_values"])
    return timm_beit_kwargs(probe)


def student_from_checkpoint(ckpt: dict):
    """The student of a pre-training checkpoint, weights loaded strictly: a
    :class:`~tokenmorph.models.MaskedViTStudent` (BEiT framework) or :class:`~tokenmorph.models.MAEStudent`."""
    from .models import create_mae_student, create_student

    arch = ckpt["student_arch"]
    stats = ckpt.get("data_stats", {})
    common = dict(target_dim=ckpt["target_dim"], drop_path_rate=0.0, mean=stats.get("mean", (0.485, 0.456, 0.406)),
                  std=stats.get("std", (0.229, 0.224, 0.225)))
    keys = ("img_size", "patch_size", "depth", "embed_dim", "num_heads")
    if arch.get("framework") == "mae":
        keys += ("decoder_depth", "decoder_dim", "decoder_heads")
        student = create_mae_student(ckpt.get("student_size", "tiny"), **common, **{k: arch[k] for k in keys})
    else:
        keys += ("init_values",)
        student = create_student(ckpt.get("student_size", "tiny"), **common, **{k: arch[k] for k in keys})
    student.load_state_dict(ckpt["model"])
    return student


def load_backbone(spec: str, device="cpu", random_init: bool = False, img_size: Optional[int] = None) -> Backbone:
    """A frozen evaluation encoder.

    Args:
        spec: a tokenmorph checkpoint file, a run folder (newest checkpoint), or ``timm:NAME``.
        device: where to put it.
        random_init: for ``timm:NAME``, random weights instead of the hub's pretrained ones.
        img_size: for ``timm:NAME``, the input side (default: the model's pretrained config).
    """
    from .train import TrainingError

    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:"):]
        kwargs = {"img_size": img_size} if img_size else {}
        try:
            model = timm.create_model(name, pretrained=not random_init, num_classes=0, **kwargs)
        except Exception as e:
            raise TrainingError(f"cannot build {spec} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                f"without internet pass random_init") from None
        cfg = model.pretrained_cfg
        side = img_size or cfg.get("input_size", (3, 224, 224))[-1]
        return Backbone(spec, model.eval().requires_grad_(False).to(device), side, cfg.get("mean", (0.485, 0.456, 0.406)),
                        cfg.get("std", (0.229, 0.224, 0.225)), getattr(model, "num_prefix_tokens", 0), model.num_features)
    ckpt, path = load_pretrain_checkpoint(spec, "evaluation of a backbone")
    student = student_from_checkpoint(ckpt)
    encoder = student.encoder.eval().requires_grad_(False).to(device)
    return Backbone(str(path), encoder, student.arch["img_size"], tuple(student.mean.flatten().tolist()),
                    tuple(student.std.flatten().tolist()), 1, student.embed_dim)
