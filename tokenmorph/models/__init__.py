"""Models: the students (BEiT framework: :class:`MaskedViTStudent`; MAE framework:
:class:`MAEStudent`), the frozen teachers (:mod:`.teachers`), the one student -> timm mapping
(:mod:`.arch`), the typed record of a pre-trained student (:class:`StudentRecord`), and the
segmentation models on a ViT (:mod:`.segmentation`: UperNet, DINOv2's linear head)."""

from .arch import (
    DECODER_PRESETS,
    STUDENT_SIZES,
    encoder_shape,
    timm_encoder_kwargs,
    timm_model_name,
)
from .build import build_student, student_from_checkpoint
from .mae import MAEStudent, create_mae_student
from .record import StudentRecord
from .student import MaskedViTStudent, create_student

__all__ = [
    "STUDENT_SIZES",
    "encoder_shape",
    "timm_encoder_kwargs",
    "timm_model_name",
    "build_student",
    "student_from_checkpoint",
    "DECODER_PRESETS",
    "MAEStudent",
    "create_mae_student",
    "StudentRecord",
    "MaskedViTStudent",
    "create_student",
]
