"""Student networks: ``create_student`` builds the BEiT-style masked ViT of DTM, ``create_mae_student`` the
MAE-framework encoder-decoder."""
from .mae import DECODER_PRESETS, MAEStudent, create_mae_student, timm_vit_kwargs
from .student import STUDENT_SIZES, MaskedViTStudent, create_student, timm_beit_kwargs

__all__ = ["STUDENT_SIZES", "MaskedViTStudent", "create_student", "timm_beit_kwargs", "DECODER_PRESETS", "MAEStudent",
           "create_mae_student", "timm_vit_kwargs"]
