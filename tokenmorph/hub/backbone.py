"""Backbones: the one place that turns what a user names into an encoder, for every command
that takes one (evaluation, fine-tuning, segmentation).

:func:`resolve_encoder` accepts (:data:`BACKBONE_FORMS`): a run folder (its newest readable
checkpoint), a pre-training checkpoint file, ``dtm-release:FILE`` (a checkpoint of the official
DTM release), an export (a hub folder of ``tokenmorph export``, or the older
``.safetensors``/``.json`` pair), ``local-dir:DIR`` (any timm hub folder), ``hf-hub:NAME`` (a
timm model on the Hugging Face Hub) and ``timm:NAME`` (timm's registry, with its pretrained
weights). :func:`load_backbone` wraps the result for frozen-feature evaluation: [0, 1] images to
pooled features or tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models import student_from_checkpoint
from .formats import TIMM_PREFIXES
from .pretrained import BACKBONE_FORMS, load_pretrain_checkpoint

__all__ = [
    "BACKBONE_FORMS",
    "Backbone",
    "load_backbone",
    "load_pretrain_checkpoint",
    "resolve_encoder",
]


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


def resolve_encoder(spec: str, purpose: str, random_init: bool = False, **timm_kwargs):
    """(encoder, source) of any of :data:`BACKBONE_FORMS`.

    ``encoder`` has ``arch`` (the tokenmorph architecture dict; None for a timm model that is
    not a Beit or a plain ViT), ``encoder`` (the timm module), ``mean`` and ``std`` (of [0, 1]
    inputs): the student itself for a pre-training checkpoint, an
    :class:`~.export.ExportedEncoder` otherwise. ``source`` is the checkpoint path or the spec.

    ``random_init`` (``timm:``/``hf-hub:``/``local-dir:`` only): the architecture without its
    weights. ``timm_kwargs`` go to ``timm.create_model`` for those three (e.g. ``img_size``,
    ``drop_path_rate``). Errors are one line (``CheckpointError``, ``ModelError``).
    """
    from .export import is_export, load_export, load_timm_source

    spec = str(spec)
    if spec.startswith(TIMM_PREFIXES):
        enc = load_timm_source(spec, pretrained=not random_init, **timm_kwargs)
        return enc, spec
    if is_export(spec):
        enc = load_export(spec)
        return enc, enc.source
    ckpt, path, record = load_pretrain_checkpoint(spec, purpose)
    return student_from_checkpoint(ckpt, record, str(path)), path


def load_backbone(
    spec: str, device="cpu", random_init: bool = False, img_size: int | None = None
) -> Backbone:
    """A frozen evaluation encoder.

    Args:
        spec: any of :data:`BACKBONE_FORMS` (:func:`resolve_encoder`).
        device: where to put it.
        random_init: for ``timm:``/``hf-hub:``/``local-dir:``, random weights instead of the
            saved ones.
        img_size: for those three, the input side (default: the model's pretrained config).
    """
    kwargs = {"img_size": img_size} if img_size and spec.startswith(TIMM_PREFIXES) else {}
    enc, source = resolve_encoder(spec, "evaluation of a backbone", random_init, **kwargs)
    model = enc.encoder
    cfg = getattr(model, "pretrained_cfg", None) or {}
    side = img_size if kwargs else None
    side = side or (enc.arch or {}).get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]
    return Backbone(
        str(source),
        model.eval().requires_grad_(False).to(device),
        side,
        tuple(torch.as_tensor(enc.mean).flatten().tolist()),
        tuple(torch.as_tensor(enc.std).flatten().tolist()),
        getattr(model, "num_prefix_tokens", 0),
        model.num_features,
    )
