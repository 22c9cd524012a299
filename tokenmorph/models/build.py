"""Students from records: rebuild the student a pre-training checkpoint describes and load its
weights."""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError
from .mae import create_mae_student
from .record import StudentRecord
from .student import create_student

__all__ = ["build_student", "student_from_checkpoint"]


def build_student(record: StudentRecord, drop_path_rate: float = 0.0) -> nn.Module:
    """A freshly initialised student of ``record``'s framework and shape: a
    :class:`~tokenmorph.models.MaskedViTStudent` (BEiT framework) or
    :class:`~tokenmorph.models.MAEStudent`."""
    create = create_mae_student if record.framework == "mae" else create_student
    return create(record.size, drop_path_rate=drop_path_rate, **record.student_kwargs())


def student_from_checkpoint(
    ckpt: dict, record: StudentRecord | None = None, source: str = "checkpoint"
):
    """The student of a pre-training checkpoint dict, its weights loaded strictly
    (``CheckpointError`` naming the keys when they do not fit)."""
    record = record or StudentRecord.from_checkpoint(ckpt, source)
    student = build_student(record)
    try:
        student.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{source}: the weights do not fit the student it describes ({first})"
        ) from None
    return student
