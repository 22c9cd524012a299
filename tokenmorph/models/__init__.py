"""Student networks. ``create_student(size, ...)`` builds the BEiT-style masked ViT of DTM."""
from .student import STUDENT_SIZES, MaskedViTStudent, create_student, timm_beit_kwargs

__all__ = ["STUDENT_SIZES", "MaskedViTStudent", "create_student", "timm_beit_kwargs"]
