"""What a pre-training checkpoint describes, as one typed record.

A pre-training checkpoint stores its student as plain entries (``student_arch``,
``student_size``, ``target_dim``, ``data_stats``, and the teacher in ``compat``);
:class:`StudentRecord` reads them once, checks them, and is what every consumer (evaluation,
fine-tuning, export, pictures) asks instead of chains of ``.get()``. Checkpoints written before
the MAE framework existed have no ``framework`` key: they are BEiT-framework students.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import CheckpointError
from .arch import framework_of, rel_pos_of

__all__ = ["StudentRecord"]

_ARCH_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
_DECODER_KEYS = ("decoder_depth", "decoder_dim", "decoder_heads")


@dataclass(frozen=True)
class StudentRecord:
    """A pre-trained student: its framework, shape, targets and input conventions.

    Attributes:
        framework: "beit" (DTM's masked ViT, a timm ``Beit`` encoder) or "mae" (a timm
            ``VisionTransformer`` encoder and a decoder).
        size: the size name it was built from (tiny / small / base / large; the shape below is
        what counts).
        arch: the architecture dict (``student_arch``): img_size, patch_size, embed_dim, depth,
            num_heads, and init_values and rel_pos (BEiT) or the decoder's shape (MAE).
        target_dim: D of the head's (BEiT) or decoder's (MAE) predictions.
        teacher: the teacher it was trained against ("pixels" for pixel targets; None if not
        recorded). mean, std: the input normalisation of [0, 1] images it was trained with.
        step: the optimiser step of the checkpoint (None if not recorded).
    """

    framework: str
    size: str
    arch: dict
    target_dim: int
    teacher: str | None
    mean: tuple
    std: tuple
    step: int | None = None

    @property
    def img_size(self) -> int:
        return self.arch["img_size"]

    @property
    def patch_size(self) -> int:
        return self.arch["patch_size"]

    @property
    def grid(self) -> tuple[int, int]:
        side = self.arch["img_size"] // self.arch["patch_size"]
        return side, side

    @property
    def embed_dim(self) -> int:
        return self.arch["embed_dim"]

    def student_kwargs(self) -> dict:
        """Keyword arguments of ``create_student`` / ``create_mae_student`` that rebuild this
        student."""
        keys = _ARCH_KEYS + (_DECODER_KEYS if self.framework == "mae" else ("init_values",))
        layout = {} if self.framework == "mae" else {"rel_pos": rel_pos_of(self.arch)}
        return dict(
            target_dim=self.target_dim,
            mean=self.mean,
            std=self.std,
            **{k: self.arch[k] for k in keys},
            **layout,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: dict, source: str = "checkpoint") -> StudentRecord:
        """The record of a pre-training checkpoint dict; ``CheckpointError`` naming ``source``
           when
        it does not describe a student."""
        arch = ckpt.get("student_arch")
        if not isinstance(arch, dict):
            raise CheckpointError(
                f"{source} has no student architecture record (student_arch); it was not "
                f"written by tokenmorph pretrain"
            )
        framework = framework_of(arch)
        needed = _ARCH_KEYS + (_DECODER_KEYS if framework == "mae" else ("init_values",))
        missing = [k for k in needed if k not in arch]
        if missing or "target_dim" not in ckpt:
            raise CheckpointError(
                f"{source}: its student record lacks {missing or ['target_dim']}; the file is "
                f"damaged or not from tokenmorph pretrain"
            )
        stats = ckpt.get("data_stats") or {}
        return cls(
            framework=framework,
            size=ckpt.get("student_size", "tiny"),
            arch=dict(arch),
            target_dim=int(ckpt["target_dim"]),
            teacher=(ckpt.get("compat") or {}).get("teacher"),
            mean=tuple(stats.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(stats.get("std", IMAGENET_DEFAULT_STD)),
            step=ckpt.get("step"),
        )

    def checkpoint_entries(self) -> dict:
        """The entries a pre-training checkpoint stores for this record (read back by
        :meth:`from_checkpoint`)."""
        return {
            "student_arch": dict(self.arch),
            "student_size": self.size,
            "target_dim": self.target_dim,
            "data_stats": {"mean": list(self.mean), "std": list(self.std)},
        }
