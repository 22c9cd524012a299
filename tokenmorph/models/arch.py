"""Student shapes, and the one mapping from a student's architecture to timm.

Both students' encoders *are* timm models: the BEiT framework's a ``Beit`` (relative position
bias, no absolute position embedding, LayerScale), the MAE framework's a ``VisionTransformer``
(fixed sin-cos ``pos_embed``, class token). :func:`timm_encoder_kwargs` is the only place that
spells out which timm keyword arguments give an encoder of a given architecture; the students,
fine-tuning, export and backbone loading all use it, so a checkpoint's ``state_dict`` always
loads into the timm model it names.

An architecture is a plain dict (a checkpoint's ``student_arch``): ``img_size``, ``patch_size``,
``embed_dim``, ``depth``, ``num_heads``, plus ``init_values`` and ``rel_pos`` (BEiT; an
architecture without ``rel_pos`` was written before it existed: one shared table) or
``framework="mae"`` and the decoder's shape (MAE).
"""

from __future__ import annotations

__all__ = [
    "STUDENT_SIZES",
    "DECODER_PRESETS",
    "FRAMEWORKS",
    "REL_POS",
    "encoder_shape",
    "framework_of",
    "timm_family",
    "timm_model_name",
    "timm_encoder_kwargs",
    "rel_pos_of",
]

# size -> (embed_dim, depth, num_heads); tiny is DeiT-tiny's shape, for CPU-scale runs.
STUDENT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
# MAE-framework decoder preset -> (depth, width, heads): Beyond Masking's release 4 x 384 with 6
# heads (head dim 64), MAE's 8 x 512 with 16 heads (head dim 32)
DECODER_PRESETS = {"release": (4, 384, 6), "mae": (8, 512, 16)}
# pre-training framework -> timm model family of its encoder
FRAMEWORKS = {"beit": "beit", "mae": "vit"}
# where a Beit keeps its relative position bias: one table shared by every block, one per block,
# or both (each block's own table plus the shared one, added: the DTM release's pre-training)
REL_POS = ("shared", "per_block", "both")


def encoder_shape(
    size: str,
    img_size: int,
    patch_size: int,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of a size name with overrides; ValueError for impossible
    shapes."""
    if size not in STUDENT_SIZES:
        raise ValueError(f"unknown student size {size!r}; choose one of {', '.join(STUDENT_SIZES)}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    d, L, h = STUDENT_SIZES[size]
    embed_dim, depth, num_heads = embed_dim or d, depth or L, num_heads or h
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return embed_dim, depth, num_heads


def framework_of(arch: dict) -> str:
    """ "beit" or "mae" (architectures written before the MAE framework existed have no key:
    BEiT)."""
    return arch.get("framework", "beit")


def timm_family(arch: dict) -> str:
    """ "beit" (timm's ``Beit``) or "vit" (timm's ``VisionTransformer``)."""
    return FRAMEWORKS[framework_of(arch)]


def timm_model_name(arch: dict) -> str:
    """The timm registry entry whose class builds this encoder. Only the class matters (the
       keyword
    arguments spell out the whole shape): ``*_large_patch16_224`` for the large shape,
    ``*_base_patch16_224`` otherwise (timm has no tiny or small BEiT)."""
    large = (arch["embed_dim"], arch["depth"], arch["num_heads"]) == (1024, 24, 16)
    return f"{timm_family(arch)}_{'large' if large else 'base'}_patch16_224"


def rel_pos_of(arch: dict) -> str:
    """Where a BEiT architecture keeps its relative position bias (:data:`REL_POS`); "shared" for
    architectures recorded before the choice existed."""
    return arch.get("rel_pos", "shared")


def timm_encoder_kwargs(arch: dict, rel_pos: str | None = None, **overrides) -> dict:
    """Keyword arguments for ``timm.create_model(timm_model_name(arch), ...)`` (or the timm
    class) that build an encoder whose ``state_dict`` matches the student's ``encoder`` key for
    key.

    ``rel_pos`` (BEiT only): ``"shared"`` (one table for every block), ``"per_block"`` (each
    block its own: fine-tuning's and export's layout) or ``"both"`` (each block's own table plus
    the shared one, added before the softmax: the DTM release's pre-training); None is the
    architecture's own (:func:`rel_pos_of`). ``overrides`` are added last (e.g. ``num_classes``,
    ``global_pool``, ``drop_path_rate``, a new ``img_size``).
    """
    rel_pos = rel_pos_of(arch) if rel_pos is None else rel_pos
    if rel_pos not in REL_POS:
        raise ValueError(f"rel_pos must be one of {REL_POS}, got {rel_pos!r}")
    kwargs = dict(
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=4.0,
        qkv_bias=True,
    )
    if timm_family(arch) == "vit":  # LayerNorm eps 1e-6 (timm's default), as MAE
        kwargs.update(class_token=True)
    else:
        kwargs.update(
            init_values=arch["init_values"],
            use_abs_pos_emb=False,
            use_rel_pos_bias=rel_pos in ("per_block", "both"),
            use_shared_rel_pos_bias=rel_pos in ("shared", "both"),
        )
    kwargs.update(overrides)
    return kwargs
