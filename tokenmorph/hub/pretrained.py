"""Pre-training checkpoints as backbones: a checkpoint file, a run folder (its newest readable
checkpoint) or ``dtm-release:FILE``, read with their student record."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CheckpointError
from ..models import StudentRecord
from ..runtime.checkpoints import latest_checkpoint, load_checkpoint, newest_readable_checkpoint
from .formats import TIMM_PREFIXES, is_export
from .release_weights import DTM_RELEASE_PREFIX, dtm_release_checkpoint

__all__ = ["BACKBONE_FORMS", "load_pretrain_checkpoint"]

BACKBONE_FORMS = (
    "a run folder, a pre-training checkpoint, dtm-release:FILE, an export folder (or its older "
    ".safetensors/.json), local-dir:DIR, hf-hub:NAME or timm:NAME"
)


def _warn(text: str) -> None:
    print(f"[tokenmorph] {text}", file=sys.stderr, flush=True)


def load_pretrain_checkpoint(spec, purpose: str) -> tuple[dict, Path, StudentRecord]:
    """(checkpoint, path, record) of a pre-training checkpoint file or run folder (its newest
    readable checkpoint; newer unreadable ones are named on stderr), or of ``dtm-release:FILE``,
    a checkpoint of the official DTM release (:func:`~.release_weights.dtm_release_checkpoint`);
    one-line errors for a missing path, an export or a timm name (which hold no training
    state), another kind of checkpoint, or one without a student record."""
    if str(spec).startswith(DTM_RELEASE_PREFIX):
        path = Path(str(spec)[len(DTM_RELEASE_PREFIX) :])
        ckpt, _ = dtm_release_checkpoint(path)
        return ckpt, path, StudentRecord.from_checkpoint(ckpt, str(path))
    if str(spec).startswith(TIMM_PREFIXES) or is_export(spec):
        raise CheckpointError(
            f"{spec} is an encoder only; {purpose} needs a pre-training checkpoint or run folder "
            "(tokenmorph pretrain)"
        )
    spec = Path(spec)
    if spec.is_dir():  # a run folder: its newest checkpoint that reads (unreadable ones named)
        path, ckpt = newest_readable_checkpoint(spec, _warn)
    else:
        path = latest_checkpoint(spec)
        ckpt = load_checkpoint(path) if path is not None else None
    if path is None:
        raise CheckpointError(
            f"no checkpoint found at {spec}: give {BACKBONE_FORMS} (a run folder needs readable "
            "checkpoints in checkpoints/)"
        )
    if ckpt.get("kind") != "pretrain":
        raise CheckpointError(
            f"{path} is a {ckpt.get('kind')!r} checkpoint; {purpose} needs a pre-training "
            f"checkpoint (tokenmorph pretrain)"
        )
    return ckpt, path, StudentRecord.from_checkpoint(ckpt, str(path))
