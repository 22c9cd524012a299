"""Official MAE checkpoints (facebookresearch/mae) in and out of the MAE student: the
encoder-only ``mae_pretrain_vit_*.pth`` files and the ``mae_visualize_vit_*.pth`` files with the
decoder.

:func:`load_mae_checkpoint` loads one into an existing student strictly (every tensor of the
file placed, every student tensor filled, except the decoder when the file has none) and says
what it did; :func:`mae_student_from_checkpoint` builds the student a file describes (for
``tokenmorph viz reconstruct --mae-checkpoint``). The key mapping is
:mod:`tokenmorph.models.layouts`.
"""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError, ModelError
from ..models import create_mae_student
from ..models.layouts import mae_arch, mae_layout, mae_to_student
from ..models.weights import read_state_dict, short_keys
from .init_from import InitSource, load_into_student

__all__ = ["load_mae_checkpoint", "read_mae_checkpoint", "mae_student_from_checkpoint"]


def read_mae_checkpoint(path: str) -> tuple[dict, str]:
    """(state dict, layout) of an official MAE checkpoint file; ``CheckpointError`` for a file
    in another layout."""
    try:
        sd = read_state_dict(path, "MAE checkpoint")
    except ModelError as e:  # a missing or unreadable file
        raise CheckpointError(str(e)) from None
    layout = mae_layout(sd)
    if layout is None:
        raise CheckpointError(
            f"{path} is not an MAE checkpoint (no top-level cls_token and patch_embed.proj.weight,"
            f" first keys: {short_keys(list(sd))}); pass a facebookresearch/mae .pth file"
        )
    return sd, layout


def load_mae_checkpoint(student: nn.Module, path: str) -> str:
    """Load an official MAE checkpoint into an :class:`~tokenmorph.models.MAEStudent` strictly,
    by ``init_from``'s loader (:func:`tokenmorph.hub.init_from.load_into_student`).

    The encoder-only layout must fill the whole encoder (the decoder and the mask token keep
    their fresh initialisation); the visualize layout must fill everything. Any key of the file
    that has no place, any student key left empty, or a shape that differs is a
    ``CheckpointError`` naming the keys. Returns a one-line description of what was loaded.
    """
    sd, layout = read_mae_checkpoint(path)
    source = InitSource(str(path), f"MAE {layout} layout", "mae", mae_to_student(sd))
    return load_into_student(student, source, strict=True)


def mae_student_from_checkpoint(path: str, **kwargs) -> tuple[nn.Module, str, dict]:
    """(student, layout, arch): the MAE student of an official checkpoint's shape (heads from
    MAE's released sizes, :func:`tokenmorph.models.layouts.mae_arch`), its weights loaded by
    :func:`load_mae_checkpoint`. ``kwargs`` go to ``create_mae_student`` (e.g. ``mean`` /
    ``std``); without a decoder in the file the decoder is MAE's 8 x 512."""
    sd, layout = read_mae_checkpoint(path)
    arch = mae_arch(sd)
    arch.setdefault("decoder_depth", 8)
    arch.setdefault("decoder_dim", 512)
    arch.setdefault("decoder_heads", 16)
    arch.setdefault("target_dim", arch["patch_size"] ** 2 * 3)
    try:
        student = create_mae_student("base", **arch, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build its MAE student ({e})") from None
    load_mae_checkpoint(student, path)
    return student, layout, arch
