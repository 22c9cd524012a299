"""Frozen image encoders for evaluation: a tokenmorph checkpoint's student encoder, or any timm
model.

``load_backbone(spec)`` accepts a checkpoint file, a run folder (its newest checkpoint),
``dtm-release:FILE`` (a checkpoint of the official DTM release) or ``timm:NAME``; the result
turns [0, 1] images into pooled features or tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..errors import CheckpointError, ModelError
from ..models import StudentRecord, student_from_checkpoint
from ..runtime.checkpoints import latest_checkpoint, load_checkpoint, newest_readable_checkpoint
from .release_weights import DTM_RELEASE_PREFIX, dtm_release_checkpoint

__all__ = ["Backbone", "load_backbone", "load_pretrain_checkpoint"]

POOLS = ("cls", "mean")


@dataclass
class Backbone:
    """A frozen encoder with its input conventions.

    Attributes:
        name: where it came from (checkpoint path or ``timm:NAME``).
        model: a timm-style module with ``forward_features(x) -> (B, prefix + N, D)`` (or (B, D,
        h, w)).
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
        """(B, 3, H, W) in [0, 1] -> (B, prefix + N, D) tokens (a CNN map is flattened, no
        prefix)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        out = self.model.forward_features((images - mean) / std)
        if out.dim() == 4:
            out = out.flatten(2).transpose(1, 2)
        return out

    def features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D): the CLS token (``pool="cls"``; mean of patch tokens
        when the model has no CLS token) or the mean of the patch tokens (``pool="mean"``)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        t = self.tokens(images)
        if pool == "cls" and self.num_prefix_tokens > 0:
            return t[:, 0]
        return t[:, self.num_prefix_tokens :].mean(dim=1)


def _warn(text: str) -> None:
    print(f"[tokenmorph] {text}", file=sys.stderr, flush=True)


def load_pretrain_checkpoint(spec, purpose: str) -> tuple[dict, Path, StudentRecord]:
    """(checkpoint, path, record) of a pre-training checkpoint file or run folder (its newest
    readable checkpoint; newer unreadable ones are named on stderr), or of ``dtm-release:FILE``,
    a checkpoint of the official DTM release (:func:`~.release_weights.dtm_release_checkpoint`);
    one-line errors for a missing path, another kind of checkpoint, or one without a student
    record."""
    if str(spec).startswith(DTM_RELEASE_PREFIX):
        path = Path(str(spec)[len(DTM_RELEASE_PREFIX) :])
        ckpt, _ = dtm_release_checkpoint(path)
        return ckpt, path, StudentRecord.from_checkpoint(ckpt, str(path))
    spec = Path(spec)
    if spec.is_dir():  # a run folder: its newest checkpoint that reads (unreadable ones named)
        path, ckpt = newest_readable_checkpoint(spec, _warn)
    else:
        path = latest_checkpoint(spec)
        ckpt = load_checkpoint(path) if path is not None else None
    if path is None:
        raise CheckpointError(
            f"no checkpoint found at {spec}: give a checkpoint file or a run folder with readable "
            "checkpoints in checkpoints/"
        )
    if ckpt.get("kind") != "pretrain":
        raise CheckpointError(
            f"{path} is a {ckpt.get('kind')!r} checkpoint; {purpose} needs a pre-training "
            f"checkpoint (tokenmorph pretrain)"
        )
    return ckpt, path, StudentRecord.from_checkpoint(ckpt, str(path))


def load_backbone(
    spec: str, device="cpu", random_init: bool = False, img_size: int | None = None
) -> Backbone:
    """A frozen evaluation encoder.

    Args:
        spec: a tokenmorph checkpoint file, a run folder (newest checkpoint),
            ``dtm-release:FILE`` or ``timm:NAME``.
        device: where to put it.
        random_init: for ``timm:NAME``, random weights instead of the hub's pretrained ones.
        img_size: for ``timm:NAME``, the input side (default: the model's pretrained config).
    """
    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:") :]
        kwargs = {"img_size": img_size} if img_size else {}
        try:
            model = timm.create_model(name, pretrained=not random_init, num_classes=0, **kwargs)
        except Exception as e:
            raise ModelError(
                f"cannot build {spec} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"without internet pass random_init"
            ) from None
        cfg = model.pretrained_cfg
        side = img_size or cfg.get("input_size", (3, 224, 224))[-1]
        return Backbone(
            spec,
            model.eval().requires_grad_(False).to(device),
            side,
            cfg.get("mean", IMAGENET_DEFAULT_MEAN),
            cfg.get("std", IMAGENET_DEFAULT_STD),
            getattr(model, "num_prefix_tokens", 0),
            model.num_features,
        )
    ckpt, path, record = load_pretrain_checkpoint(spec, "evaluation of a backbone")
    student = student_from_checkpoint(ckpt, record, str(path))
    encoder = student.encoder.eval().requires_grad_(False).to(device)
    return Backbone(
        str(path),
        encoder,
        student.arch["img_size"],
        tuple(student.mean.flatten().tolist()),
        tuple(student.std.flatten().tolist()),
        1,
        student.embed_dim,
    )
