"""Export a pre-trained student encoder as a timm checkpoint (safetensors + a JSON recipe): a
``Beit`` for a DTM (``framework=beit``) student, a ``VisionTransformer`` for an MAE
(``framework=mae``) one.

``tokenmorph export CKPT OUT.safetensors`` writes the encoder's weights and ``OUT.json``; then::

    import json, timm
    spec = json.load(open("OUT.json"))
    model = timm.create_model(spec["timm_model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file="OUT.safetensors"), **spec["kwargs"])

builds the encoder in timm and loads the weights strictly, for every student size and geometry.

How the recipe is built, and why:

* ``timm_model`` only picks timm's BEiT entry point (``beit_large_patch16_224`` for the large
  shape, ``beit_base_patch16_224`` otherwise; timm has no tiny or small BEiT). ``kwargs`` spell
  out the whole architecture (size, patch, grid, LayerScale, relative position bias, no
  absolute position embedding), so the entry point's defaults never decide anything.
* The relative position bias is exported per block (timm's ``use_rel_pos_bias``, the layout of
  timm's own BEiT weights and of fine-tuning) for a student with per-block tables: a "both"
  student's block gets its own table plus the shared one, which is the same function (the bias
  added before the softmax is the sum of the two tables at the same index). A shared-only
  student keeps its one shared table.
* ``kwargs["pretrained_cfg"]`` replaces the registry's pretrained config. timm's
  ``load_pretrained`` turns strict loading off whenever the model's ``num_classes`` differs from
  the pretrained config's (1000 or 21841 for timm's BEiT tags), which an encoder
  (``num_classes=0``) always would: a missing or stray key would then pass silently. With
  ``num_classes=0`` in the config the load is strict. The config also carries the checkpoint's
  input size and mean/std, so ``timm.data.resolve_data_config(model=model)`` normalises as
  pre-training did, and ``classifier="head"``, so that adding ``num_classes=K`` for fine-tuning
  takes timm's usual path: a new head, every other weight loaded.
* The final LayerNorm stays ``norm`` (on the tokens) for every ``global_pool``. timm's Beit moves
  it after the pooling (``fc_norm``, with ``norm`` an identity) when ``global_pool="avg"`` unless
  ``use_fc_norm=False``: that would be a different function of the same weights. So
  ``forward_features(x)`` returns exactly tokenmorph's encoder tokens (B, 1 + N, D) after the
  final norm, and the pooled feature is the mean of the normalised patch tokens (``avg``) or the
  normalised CLS token (``token``); ``global_pool=""`` makes ``model(x)`` return the tokens. To
  change the pooling, export again (or also pass ``use_fc_norm=False`` with
  ``global_pool="avg"``).
* An MAE student's encoder *is* a timm ``VisionTransformer`` (class token, qkv bias, no
  LayerScale, an absolute ``pos_embed``: MAE's fixed sin-cos table, exported as a plain weight
  that timm treats as learnable). ``timm_model`` is ``vit_large_patch16_224`` for the large
  shape, ``vit_base_patch16_224`` otherwise, and ``kwargs`` again spell out the whole
  architecture; the decoder is not exported. The ``pretrained_cfg`` is the same, and so is the
  final norm: timm's ViT would also swap ``norm`` for an ``fc_norm`` with ``global_pool="avg"``,
  which the recipe prevents with ``fc_norm=False`` (to change the pooling, export again, or also
  pass ``fc_norm=False`` with ``global_pool="avg"``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..models.arch import rel_pos_of, timm_encoder_kwargs, timm_family, timm_model_name
from ..models.layouts import per_block_tables
from ..runtime.run_logger import dump_json

__all__ = [
    "GLOBAL_POOLS",
    "EXPORT_FORMAT",
    "export_layout",
    "export_state",
    "export_encoder",
    "timm_spec",
    "timm_call",
    "ExportedEncoder",
    "is_export",
    "load_export",
]

EXPORT_FORMAT = "tokenmorph-timm-export-v1"
GLOBAL_POOLS = ("avg", "token", "")


def export_layout(arch: dict) -> str | None:
    """The relative position layout of a BEiT student's export: "per_block" when the student has
    per-block tables ("per_block" or "both"), "shared" for a shared-only one; None for a ViT."""
    if timm_family(arch) != "beit":
        return None
    return "shared" if rel_pos_of(arch) == "shared" else "per_block"


def export_state(arch: dict, encoder_state: dict) -> dict:
    """The exported weights of an encoder state: a "both" student's tables merged into one per
    block (its own plus the shared one, :func:`~tokenmorph.models.layouts.per_block_tables`), so
    that the per-block timm Beit computes the same function; other layouts as they are."""
    if timm_family(arch) == "beit" and rel_pos_of(arch) == "both":
        return per_block_tables(encoder_state, arch["depth"], "own_plus_shared")
    return dict(encoder_state)


def timm_spec(arch: dict, global_pool: str, mean, std, description: str = "") -> tuple[str, dict]:
    """(timm model name, JSON-ready keyword arguments) that rebuild a student encoder of ``arch``
    (a checkpoint's ``student_arch``) in timm and load its exported weights strictly."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    kwargs = timm_encoder_kwargs(
        arch, rel_pos=export_layout(arch), num_classes=0, global_pool=global_pool
    )
    if global_pool == "avg":
        # keep the final norm on the tokens (timm would otherwise pool first, then apply
        # fc_norm); only set when needed because timm releases older than these arguments refuse
        # them
        kwargs["fc_norm" if timm_family(arch) == "vit" else "use_fc_norm"] = False
    side = arch["img_size"]
    kwargs["pretrained_cfg"] = dict(
        # the relative position bias (Beit) or the absolute position embedding (ViT) fixes the
        # grid
        input_size=[3, side, side],
        fixed_input_size=True,
        interpolation="bicubic",
        crop_pct=0.875,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        num_classes=0,  # equal to the model's: timm then loads strictly
        classifier="head",
        first_conv="patch_embed.proj",
        description=description,
    )
    return timm_model_name(arch), kwargs


def _check_loadable(name: str, kwargs: dict, state: dict, source: Path) -> None:
    """Build the timm model on the meta device (no memory, no init cost) and check that its state
    dict has exactly the keys and shapes of ``state``: a damaged checkpoint, or a timm that
    builds Beit (or VisionTransformer) differently, fails here, at export time, with a clear
    message rather than when loading."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"timm {timm.__version__} cannot build this encoder ({e}); with an older timm, "
            f"export with --global-pool token or ''"
        ) from None
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in state.items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        raise CheckpointError(
            f"{source}: the encoder's weights do not match the {type(model).__name__} that timm "
            f"{timm.__version__} builds for its architecture (differing: {', '.join(diff[:5])})"
        )


def _check_output(out_path: Path, force: bool) -> None:
    """``ConfigError`` before any work for an output that is a folder, that exists (without
    ``force``), or whose folder cannot be written."""
    json_path = out_path.with_suffix(".json")
    for p in (out_path, json_path):
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; give the path of a .safetensors file to write")
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; pass --force to overwrite it, or another path")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_path.parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write {out_path} ({e.strerror or e}); give a path in a folder you can write to"
        ) from None


def export_encoder(
    ckpt_or_run_dir: str | Path,
    out_path: str | Path,
    global_pool: str = "avg",
    force: bool = False,
) -> tuple[Path, Path]:
    """Write the student encoder of a pre-training checkpoint for timm.

    Args:
        ckpt_or_run_dir: a checkpoint file, or a run folder (its newest checkpoint is used).
        out_path: the weights file; must end in ``.safetensors`` (timm picks the loader by the
            suffix). The recipe goes next to it, with the suffix ``.json``.
        global_pool: the timm model's pooling: ``"avg"`` (mean of the normalised patch tokens),
            ``"token"`` (normalised CLS token) or ``""`` (``model(x)`` returns the tokens). It
            changes no weight and not ``forward_features``.
        force: overwrite existing output files (refused otherwise).

    Returns:
        (weights path, JSON path).

    Raises:
        CheckpointError: no checkpoint there, not a tokenmorph checkpoint, not a pre-training
            checkpoint, weights that timm's Beit (or VisionTransformer, for an MAE student)
            cannot take.
        ConfigError: an output name without ``.safetensors``, an output that is a folder, that
            exists (without ``force``) or that cannot be written.
        ValueError: an unknown ``global_pool``.
    """
    import timm
    from safetensors.torch import save_file

    from .. import __version__
    from .backbone import load_pretrain_checkpoint

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ConfigError(
            f"{out_path}: the output must end in .safetensors (timm chooses its loader by the "
            "suffix)"
        )
    _check_output(out_path, force)
    ckpt, path, record = load_pretrain_checkpoint(ckpt_or_run_dir, "export")

    # The encoder's weights are the checkpoint's "encoder." entries (an MAE decoder is left out):
    # no student is built (for a large one that saves seconds and a copy of the weights);
    # _check_loadable verifies them against the timm model of the recipe.
    arch, step, framework = record.arch, record.step, record.framework
    encoder = {
        k[len("encoder.") :]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")
    }
    state = {k: v.contiguous() for k, v in export_state(arch, encoder).items()}
    what = "DTM" if framework == "beit" else framework
    name, kwargs = timm_spec(
        arch,
        global_pool,
        record.mean,
        record.std,
        description=f"tokenmorph {what} {record.size} student encoder, step {step} of {path}",
    )
    _check_loadable(name, json.loads(json.dumps(kwargs)), state, path)

    save_file(state, str(out_path), metadata={"format": "pt"})
    json_path = out_path.with_suffix(".json")
    spec = {
        "format": EXPORT_FORMAT,
        "timm_model": name,
        "kwargs": kwargs,
        "weights": out_path.name,
        "source_checkpoint": str(path),
        "step": step,
        "student_size": record.size,
        "framework": framework,
        "teacher": record.teacher,
        "img_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "embed_dim": arch["embed_dim"],
        "depth": arch["depth"],
        "num_heads": arch["num_heads"],
        "num_params": sum(v.numel() for v in state.values()),
        "mean": kwargs["pretrained_cfg"]["mean"],
        "std": kwargs["pretrained_cfg"]["std"],
        "global_pool": global_pool,
        "features": "forward_features(x) -> (B, 1 + N, D) tokens after the final norm (the CLS "
        "token first), for x in [0, 1] normalised with mean/std; identical to tokenmorph's encoder",
        "timm_version": timm.__version__,
        "tokenmorph_version": __version__,
    }
    json_path.write_text(dump_json(spec, indent=2) + "\n")
    return out_path, json_path


def timm_call(spec: dict, weights: str | Path, json_path: str | Path) -> str:
    """The one-line Python call that loads an export in timm."""
    return (
        f"timm.create_model({spec['timm_model']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(weights)!r}), "
        f"**json.load(open({str(json_path)!r}))['kwargs'])"
    )


# ------------------------------------------------------------------------------ reading one back
@dataclass
class ExportedEncoder:
    """An export loaded back: what fine-tuning asks of a pre-trained student (``arch``, the timm
    ``encoder`` with its weights, the input ``mean`` / ``std``), and where it came from."""

    arch: dict
    encoder: object
    mean: tuple
    std: tuple
    source: str


def _export_json(spec) -> Path | None:
    """The recipe of an export given as its ``.json`` or its ``.safetensors`` (the recipe next to
    it), or None when ``spec`` is not an export."""
    path = Path(spec)
    json_path = path.with_suffix(".json") if path.suffix == ".safetensors" else path
    if json_path.suffix != ".json" or not json_path.is_file():
        return None
    try:
        spec = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return json_path if isinstance(spec, dict) and spec.get("format") == EXPORT_FORMAT else None


def is_export(spec) -> bool:
    """Whether ``spec`` names a ``tokenmorph export`` (its .json or .safetensors)."""
    return _export_json(spec) is not None


def load_export(spec) -> ExportedEncoder:
    """Build an export's encoder in timm from its recipe and load its weights strictly (the
    documented ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` call)."""
    import timm

    json_path = _export_json(spec)
    if json_path is None:
        raise CheckpointError(
            f"{spec} is not a tokenmorph export (a .json recipe with format {EXPORT_FORMAT} next "
            "to its .safetensors)"
        )
    recipe = json.loads(json_path.read_text())
    weights = json_path.parent / recipe["weights"]
    if not weights.is_file():
        raise CheckpointError(f"{json_path}: its weights {weights} are missing")
    try:
        encoder = timm.create_model(
            recipe["timm_model"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(weights)),
            **recipe["kwargs"],
        )
    except Exception as e:  # timm raises several types for weights that do not fit
        raise CheckpointError(
            f"cannot load the export {json_path} in timm {timm.__version__} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    arch = {k: recipe[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    arch["framework"] = recipe.get("framework", "beit")
    if "init_values" in recipe["kwargs"]:
        arch["init_values"] = recipe["kwargs"]["init_values"]
    return ExportedEncoder(
        arch, encoder, tuple(recipe["mean"]), tuple(recipe["std"]), str(json_path)
    )
