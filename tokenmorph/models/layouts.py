"""Checkpoint layouts of the official releases: pure key mappings between their state dicts and
tokenmorph's students (no files here: reading them is :mod:`tokenmorph.hub`'s job).

Each section is one release. A mapping renames keys and never changes a tensor; loading stays
strict, so whatever a mapping does not place shows up as a missing or unexpected key.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "MAE_LAYOUTS",
    "MAE_DECODER_KEYS",
    "mae_layout",
    "mae_to_student",
    "mae_decoder_keys",
    "mae_arch",
]


# ---------------------------------------------------------------------------------------------
# MAE (facebookresearch/mae, models_mae.py MaskedAutoencoderViT; release-rules 11)
#
# Two layouts: "encoder" (mae_pretrain_vit_{base,large,huge}.pth: the encoder only, cls_token,
# pos_embed, patch_embed.proj.*, blocks.i.*, norm.*) and "visualize" (mae_visualize_vit_large*.pth:
# the whole autoencoder, adding mask_token, decoder_pos_embed, decoder_embed.*,
# decoder_blocks.i.*, decoder_norm.*, decoder_pred.*). Both are {'model': state_dict}. The MAE
# student keeps MAE's names with its timm encoder under "encoder." (timm's ViT Block has MAE's
# sub-names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), so the mapping is a prefix.

MAE_LAYOUTS = ("encoder", "visualize")
_MAE_ENCODER_TOP = ("cls_token", "pos_embed")
_MAE_ENCODER_MODULES = ("patch_embed.", "blocks.", "norm.")
MAE_DECODER_KEYS = ("mask_token", "decoder_pos_embed")  # top-level decoder entries
_MAE_DECODER_MODULES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
# the released encoders' heads (not recoverable from the weights): base, large, huge
_MAE_HEADS = {768: 12, 1024: 16, 1280: 16}


def _is_mae_encoder_key(key: str) -> bool:
    return key in _MAE_ENCODER_TOP or key.startswith(_MAE_ENCODER_MODULES)


def _is_mae_decoder_key(key: str) -> bool:
    return key in MAE_DECODER_KEYS or key.startswith(_MAE_DECODER_MODULES)


def mae_layout(state_dict: Mapping) -> str | None:
    """ "visualize" (encoder and decoder), "encoder" (encoder only) or None (not an MAE state
    dict: no top-level ``cls_token`` with ``patch_embed.proj.weight``)."""
    if "cls_token" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        return None
    return "visualize" if any(_is_mae_decoder_key(k) for k in state_dict) else "encoder"


def mae_to_student(state_dict: Mapping) -> dict:
    """An MAE state dict (either layout) in the MAE student's key names: encoder entries under
    ``encoder.``, decoder entries unchanged. Keys of neither kind are kept as they are, so that
    a strict load reports them as unexpected."""
    return {(f"encoder.{k}" if _is_mae_encoder_key(k) else k): v for k, v in state_dict.items()}


def mae_decoder_keys(student_keys) -> list[str]:
    """The keys of a student state dict that an encoder-only checkpoint cannot provide (the
    decoder and its mask token, left at their fresh initialisation)."""
    return [k for k in student_keys if _is_mae_decoder_key(k)]


def mae_arch(state_dict: Mapping) -> dict:
    """The MAE student shape of an MAE state dict: ``img_size``, ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads`` and, for the visualize layout, ``decoder_depth``, ``decoder_dim``,
    ``decoder_heads`` (16, MAE's for every size), ``target_dim``. Heads are not in the weights:
    MAE's released shapes give them (embed_dim / 64 for another width)."""
    patch_w = state_dict["patch_embed.proj.weight"]  # (D, 3, p, p)
    embed_dim, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    tokens = int(state_dict["pos_embed"].shape[1]) - 1
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"pos_embed holds {tokens} patch positions, not a square grid")
    arch = dict(
        img_size=side * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=_count_blocks(state_dict, "blocks."),
        num_heads=_MAE_HEADS.get(embed_dim, max(embed_dim // 64, 1)),
    )
    if "decoder_embed.weight" in state_dict:
        dec_dim = int(state_dict["decoder_embed.weight"].shape[0])
        arch.update(
            decoder_depth=_count_blocks(state_dict, "decoder_blocks."),
            decoder_dim=dec_dim,
            decoder_heads=16 if dec_dim == 512 else max(dec_dim // 32, 1),
            target_dim=int(state_dict["decoder_pred.weight"].shape[0]),
        )
    return arch


def _count_blocks(state_dict: Mapping, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0
