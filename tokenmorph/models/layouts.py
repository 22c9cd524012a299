"""State-dict layouts: pure functions between the key layouts of encoders and of the official
releases' checkpoints, and tokenmorph's students. No files are read here (that is
:mod:`tokenmorph.hub.release_weights`); every function takes and returns plain dicts of tensors.

Sections, one per layout:

* **relative position bias of a timm Beit** (:func:`per_block_tables`): a "shared", "per_block"
  or "both" encoder state (:data:`tokenmorph.models.arch.REL_POS`) to the per-block layout that
  fine-tuning and export use, by one of the rules of :data:`REL_POS_INITS`;
* **the DTM release** (naver-ai/dtm ``models/modeling_dtm.py``, the ``model`` entry of its
  ``checkpoint-*.pth``; BEiT v2's names): :func:`dtm_release_arch` reads the architecture from
  the keys and shapes, :func:`dtm_release_to_student` renames the keys to a
  :class:`~tokenmorph.models.MaskedViTStudent`'s and checks the position indices;
* **MAE** (facebookresearch/mae ``models_mae.py``, the encoder-only and the "visualize" layouts):
  :func:`mae_layout`, :func:`mae_to_student`, :func:`mae_arch`.

A mapping renames keys and never changes a tensor; loading stays strict, so whatever a mapping
does not place shows up as a missing or unexpected key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError

__all__ = [
    "REL_POS_INITS",
    "SHARED_TABLE",
    "per_block_tables",
    "rel_pos_layout",
    "to_rel_pos_layout",
    "release_relative_position_index",
    "LayoutReport",
    "DTM_RELEASE_RENAMES",
    "dtm_release_arch",
    "dtm_release_to_student",
    "MAE_LAYOUTS",
    "MAE_DECODER_KEYS",
    "mae_layout",
    "mae_to_student",
    "mae_decoder_keys",
    "mae_arch",
]


# ------------------------------------------------------------------------------------------
# relative position bias of a timm Beit encoder
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_BLOCK_TABLE = "blocks.{}.attn.relative_position_bias_table"

# fine-tuning's start of every block's table -> (what it does, the DTM release's flag)
REL_POS_INITS = {
    "own_plus_shared": "each block's own table plus the shared one (a missing one counts as "
    "zero): the release's documented launch, --init_both_rpb",
    "shared_only": "every block starts from the shared table; blocks' own tables are dropped: "
    "the release script's default --init_srpb_only (BEiT v2's)",
    "own_only": "blocks keep their own tables; the shared one is dropped: --init_rpb_only",
    "as_pretrained": "the fine-tuning model keeps the pre-trained layout and tables as they are",
}


def per_block_tables(state: dict, depth: int, rule: str = "own_plus_shared") -> dict:
    """A timm Beit encoder state with one relative position table per block and no shared one.

    Args:
        state: an encoder ``state_dict`` of any layout ("shared", "per_block", "both").
        depth: its number of blocks.
        rule: ``own_plus_shared``, ``shared_only`` or ``own_only`` (:data:`REL_POS_INITS`).
            ``own_plus_shared`` of a "both" state computes the same function (the bias a block
            adds before the softmax is its own table's plus the shared table's, entry by entry,
            and both use the same index).

    Returns:
        A new dict (the input is not modified); tables are fresh tensors.

    Raises:
        CheckpointError: ``shared_only`` without a shared table, ``own_only`` without per-block
            tables.
        ValueError: an unknown rule.
    """
    if rule not in ("own_plus_shared", "shared_only", "own_only"):
        raise ValueError(f"rule must be own_plus_shared, shared_only or own_only, got {rule!r}")
    state = dict(state)
    shared = state.pop(SHARED_TABLE, None)
    own = [state.get(_BLOCK_TABLE.format(i)) for i in range(depth)]
    if rule == "shared_only" and shared is None:
        raise CheckpointError(
            "rel_pos_init=shared_only needs a shared relative position table; this encoder has "
            "per-block tables only: use own_only or own_plus_shared"
        )
    if rule == "own_only" and any(t is None for t in own):
        raise CheckpointError(
            "rel_pos_init=own_only needs a relative position table in every block; this encoder "
            "has a shared table only: use shared_only or own_plus_shared"
        )
    for i, table in enumerate(own):
        if rule == "shared_only" or table is None:
            new = shared.clone()
        elif rule == "own_only" or shared is None:
            new = table.clone()
        else:
            new = table + shared
        state[_BLOCK_TABLE.format(i)] = new
    return state


def rel_pos_layout(state: Mapping, depth: int) -> str | None:
    """Where a timm Beit encoder state keeps its relative position bias: "shared", "per_block",
    "both" (:data:`tokenmorph.models.arch.REL_POS`), or None (no table: not a Beit)."""
    shared = SHARED_TABLE in state
    own = depth > 0 and all(_BLOCK_TABLE.format(i) in state for i in range(depth))
    if shared and own:
        return "both"
    return "shared" if shared else "per_block" if own else None


def to_rel_pos_layout(state: dict, depth: int, layout: str) -> tuple[dict, bool]:
    """A timm Beit encoder state in another relative position layout, computing the same
    function (the bias a block adds before the softmax is its own table's plus the shared
    table's, entry by entry, at the same index).

    * to "per_block": each block's own table plus the shared one (:func:`per_block_tables`);
    * to "both": the missing half as zeros (a "per_block" state gets a zero shared table, a
      "shared" one zero own tables);
    * to "shared": only from "shared" (per-block tables cannot be folded into one table).

    Returns:
        (new state, whether anything changed). A conversion that is not possible returns the
        state unchanged: a strict load then names the keys that do not fit.
    """
    source = rel_pos_layout(state, depth)
    if source is None or source == layout:
        return dict(state), False
    if layout == "per_block":
        return per_block_tables(state, depth, "own_plus_shared"), True
    if layout == "both":
        out = dict(state)
        if source == "per_block":
            out[SHARED_TABLE] = torch.zeros_like(state[_BLOCK_TABLE.format(0)])
        else:
            for i in range(depth):
                out[_BLOCK_TABLE.format(i)] = torch.zeros_like(state[SHARED_TABLE])
        return out, True
    return dict(state), False


def release_relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """The (1 + N, 1 + N) int64 index into a (2h - 1)(2w - 1) + 3 table that BEiT's releases
    store as ``relative_position_index`` (the same as timm's, which does not store it)."""
    from timm.models.beit import gen_relative_position_index

    return gen_relative_position_index(tuple(grid))


@dataclass
class LayoutReport:
    """What a layout conversion did.

    Attributes:
        layout: the source layout's name (e.g. "dtm-release").
        renamed: rule ("SOURCE_PREFIX -> TARGET_PREFIX") -> number of keys it renamed.
        checked: keys verified and dropped (each ``relative_position_index``: equal to the index
            the target computes itself).
        arch: what the source's keys and shapes say about the architecture.
    """

    layout: str
    renamed: dict = field(default_factory=dict)
    checked: list = field(default_factory=list)
    arch: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The report as text, one line per rule."""
        out = [f"{self.layout}: {sum(self.renamed.values())} keys mapped"]
        out += [f"  {rule}: {n}" for rule, n in self.renamed.items()]
        if self.checked:
            out.append(
                f"  {len(self.checked)} relative_position_index buffers equal to ours, dropped"
            )
        return out


# ------------------------------------------------------------------------------------------
# the DTM release (naver-ai/dtm), keys without prefix
# release prefix -> student prefix, first match wins; every key must match one
DTM_RELEASE_RENAMES = (
    ("lm_head.", "head."),
    ("mask_token", "mask_token"),
    ("cls_token", "encoder.cls_token"),
    ("patch_embed.", "encoder.patch_embed."),
    ("rel_pos_bias.", "encoder.rel_pos_bias."),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
)
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _grid_of_table(rows: int) -> int:
    side = round(((rows - 3) ** 0.5 + 1) / 2)
    if (2 * side - 1) ** 2 + 3 != rows:
        raise CheckpointError(
            f"a relative position table of {rows} rows does not belong to a square grid"
        )
    return side


def dtm_release_arch(state: dict) -> dict:
    """The architecture of a DTM release state dict, read from its keys and shapes.

    Returns:
        ``student_arch`` keys (framework "beit", img_size, patch_size, embed_dim, depth,
        num_heads, init_values, rel_pos) and ``target_dim`` (the ``lm_head``'s width).

    Raises:
        CheckpointError: not a DTM release state dict (no ``patch_embed.proj.weight``, no
            ``lm_head.weight`` or no block), an absolute position embedding (the student has
            none), or no relative position table to read the heads from.
    """
    needed = ("patch_embed.proj.weight", "lm_head.weight", "cls_token")
    missing = [k for k in needed if k not in state]
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if missing or depth == 0:
        raise CheckpointError(
            f"not a DTM release state dict: no {', '.join(missing) or 'blocks.*'} entries"
        )
    if "pos_embed" in state:
        raise CheckpointError(
            "this DTM release checkpoint has an absolute position embedding (pos_embed); the "
            "student has relative position bias only"
        )
    shared = SHARED_TABLE in state
    per_block = _BLOCK_TABLE.format(0) in state
    table = state.get(SHARED_TABLE, state.get(_BLOCK_TABLE.format(0)))
    if table is None:
        raise CheckpointError(
            "this DTM release checkpoint has no relative position table; its number of heads "
            "cannot be read"
        )
    weight = state["patch_embed.proj.weight"]
    embed_dim, patch = int(weight.shape[0]), int(weight.shape[-1])
    grid = _grid_of_table(int(table.shape[0]))
    return dict(
        framework="beit",
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(table.shape[1]),
        init_values=0.1 if "blocks.0.gamma_1" in state else 0.0,
        rel_pos="both" if shared and per_block else "shared" if shared else "per_block",
        target_dim=int(state["lm_head.weight"].shape[0]),
    )


def dtm_release_to_student(state: dict) -> tuple[dict, LayoutReport]:
    """A DTM release state dict (the ``model`` of its checkpoint) as a
    :class:`~tokenmorph.models.MaskedViTStudent` state dict of :func:`dtm_release_arch`'s
    architecture.

    Every key is renamed by the first matching rule of :data:`DTM_RELEASE_RENAMES` (``lm_head``
    -> ``head``, ``mask_token`` kept, the rest under ``encoder.``); every
    ``relative_position_index`` must equal the index of the grid (a table indexed otherwise
    would mean other offsets) and is dropped, as timm computes its own. The caller loads the
    result strictly.

    Raises:
        CheckpointError: a key no rule matches, or a position index that differs.
    """
    arch = dtm_release_arch(state)
    side = arch["img_size"] // arch["patch_size"]
    expected = release_relative_position_index((side, side))
    report = LayoutReport("dtm-release", arch=arch)
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            if tuple(value.shape) != tuple(expected.shape) or not torch.equal(
                value.to(torch.long), expected
            ):
                raise CheckpointError(
                    f"{key} differs from the relative position index of a {side}x{side} grid; "
                    "the tables of this checkpoint are indexed differently"
                )
            report.checked.append(key)
            continue
        for src, dst in DTM_RELEASE_RENAMES:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                rule = f"{src}* -> {dst}*"
                report.renamed[rule] = report.renamed.get(rule, 0) + 1
                break
        else:
            raise CheckpointError(
                f"DTM release key {key!r} has no counterpart in the student; the checkpoint is "
                "not DTM's pre-training model"
            )
    return out, report


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
