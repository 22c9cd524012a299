"""Official releases' checkpoint files as tokenmorph students: reading the file (safely) and
building the student it describes, loaded strictly. The key layouts are
:mod:`tokenmorph.models.layouts`.

* DTM (naver-ai/dtm ``checkpoint-*.pth``: ``{"model", "optimizer", "epoch", "scaler", "args"}``,
  the model's keys without prefix): :func:`load_dtm_release` gives the
  :class:`~tokenmorph.models.MaskedViTStudent` and a report; :func:`dtm_release_checkpoint` the
  same as a tokenmorph pre-training checkpoint dict, which is what every consumer of a
  pre-trained student reads (``--checkpoint dtm-release:PATH`` in evaluation, fine-tuning and
  export).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import CheckpointError
from ..models.arch import STUDENT_SIZES
from ..models.layouts import LayoutReport, dtm_release_to_student
from ..models.weights import one_line
from ..runtime.checkpoints import CHECKPOINT_FORMAT

__all__ = [
    "DTM_RELEASE_PREFIX",
    "read_release_file",
    "dtm_release_checkpoint",
    "load_dtm_release",
]

DTM_RELEASE_PREFIX = "dtm-release:"
# the release's normalisation without --imagenet_default_mean_and_std (IMAGENET_INCEPTION_*)
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def read_release_file(path: str | Path) -> tuple[dict, dict]:
    """(state dict, the file's other entries) of a release checkpoint, read with
    ``weights_only=True`` (an ``argparse.Namespace`` of arguments is the one non-tensor class
    allowed: nothing in the file can run code). The state is the ``model`` (or ``module``)
    entry, or the file itself when it is a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"release checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} as a release checkpoint ({one_line(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    for key in ("model", "module"):
        if isinstance(obj.get(key), dict):
            return obj[key], {k: v for k, v in obj.items() if k != key}
    return obj, {}


def _size_name(arch: dict) -> str:
    shape = (arch["embed_dim"], arch["depth"], arch["num_heads"])
    return next((name for name, s in STUDENT_SIZES.items() if s == shape), "base")


def dtm_release_checkpoint(path: str | Path) -> tuple[dict, LayoutReport]:
    """A DTM release checkpoint as a tokenmorph pre-training checkpoint dict (format, kind
    "pretrain", the student's state and its record), and the layout report.

    The student's input normalisation is the release's: ImageNet's mean/std when the file's
    ``args`` say ``imagenet_default_mean_and_std`` (the documented launch) or carry no
    arguments, else 0.5 / 0.5 (the script's default). The teacher is recorded as CLIP
    ViT-B/16."""
    state, extras = read_release_file(path)
    mapped, report = dtm_release_to_student(state)
    arch = dict(report.arch)
    target_dim = arch.pop("target_dim")
    args = extras.get("args")
    inception = args is not None and not getattr(args, "imagenet_default_mean_and_std", False)
    mean, std = _INCEPTION if inception else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    epoch = extras.get("epoch")
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "kind": "pretrain",
        "step": None,
        "release_epoch": epoch if isinstance(epoch, int) else None,
        "config": {},
        "compat": {"teacher": "clip-vit-b16", "framework": "beit", "target_dim": target_dim},
        "model": mapped,
        "student_arch": arch,
        "student_size": _size_name(arch),
        "target_dim": target_dim,
        "data_stats": {"mean": list(mean), "std": list(std)},
        "import_report": report.lines(),
    }
    return ckpt, report


def load_dtm_release(path: str | Path):
    """(student, report): the :class:`~tokenmorph.models.MaskedViTStudent` of a DTM release
    checkpoint, every weight loaded strictly (``CheckpointError`` naming the keys otherwise)."""
    from ..models import student_from_checkpoint

    ckpt, report = dtm_release_checkpoint(path)
    return student_from_checkpoint(ckpt, source=str(path)), report
