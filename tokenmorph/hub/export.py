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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError, ModelError
from ..models.arch import (
    STUDENT_SIZES,
    rel_pos_of,
    timm_encoder_kwargs,
    timm_family,
    timm_model_name,
)
from ..models.layouts import per_block_tables
from ..runtime.run_logger import dump_json
from .formats import EXPORT_FORMAT, HUB_CONFIG, export_recipe_path, is_export, is_hub_export

__all__ = [
    "GLOBAL_POOLS",
    "EXPORT_FORMAT",
    "export_layout",
    "export_state",
    "export_encoder",
    "export_hub",
    "hub_architecture",
    "push_to_hub",
    "is_hub_export",
    "timm_spec",
    "timm_call",
    "ExportedEncoder",
    "is_export",
    "export_weights",
    "load_export",
    "load_timm_source",
    "arch_of_timm_model",
]

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
    _check_writable(out_path)


def _check_writable(path: Path) -> None:
    """``ConfigError`` when ``path``'s folder cannot be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write {path} ({e.strerror or e}); give a path in a folder you can write to"
        ) from None


def _readable(path: Path) -> None:
    """Give ``path`` the mode of any file we write (``0o666`` less the umask; a folder
    ``0o777`` less it): safetensors and ``mkdtemp`` create theirs ``0o600`` / ``0o700``,
    which would hide an export from the rest of the group."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@dataclass
class _Encoder:
    """A checkpoint's encoder as it is exported: weights, timm recipe, and what it records."""

    state: dict
    name: str
    kwargs: dict
    meta: dict


def _encoder_of(ckpt_or_run_dir, global_pool: str) -> _Encoder:
    """The export of a pre-training checkpoint (file, run folder or ``dtm-release:FILE``): the
    encoder's weights, the timm recipe that loads them strictly (checked on the meta device),
    and the record that goes into the recipe file."""
    import timm

    from .. import __version__
    from .pretrained import load_pretrain_checkpoint

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
    exported_arch = {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth")}
    exported_arch.update(num_heads=arch["num_heads"], framework=framework)
    if timm_family(arch) == "beit":
        exported_arch.update(init_values=arch["init_values"], rel_pos=export_layout(arch))
    meta = {
        "format": EXPORT_FORMAT,
        "source_checkpoint": str(Path(path).resolve()),
        "step": step,
        "student_size": record.size,
        "framework": framework,
        "teacher": record.teacher,
        "arch": exported_arch,
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
    return _Encoder(state, name, kwargs, meta)


def export_encoder(
    ckpt_or_run_dir: str | Path,
    out_path: str | Path,
    global_pool: str = "avg",
    force: bool = False,
) -> tuple[Path, Path]:
    """Write the student encoder of a pre-training checkpoint for timm as one safetensors file
    and a JSON recipe (the older format; :func:`export_hub` writes timm's own hub folder).

    Args:
        ckpt_or_run_dir: a checkpoint file, or a run folder (its newest checkpoint is used).
        out_path: the weights file; must end in ``.safetensors`` (timm picks the loader by the
            suffix). The recipe goes next to it, with the suffix ``.json``; its ``weights`` is
            the absolute path of the weights (a moved pair is still found: the weights next to
            the recipe are used when that path is gone).
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
    from safetensors.torch import save_file

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ConfigError(
            f"{out_path}: the output must end in .safetensors (timm chooses its loader by the "
            "suffix), or give a folder name for timm's hub format"
        )
    _check_output(out_path, force)
    enc = _encoder_of(ckpt_or_run_dir, global_pool)
    save_file(enc.state, str(out_path), metadata={"format": "pt"})
    _readable(out_path)
    json_path = out_path.with_suffix(".json")
    spec = {
        "format": EXPORT_FORMAT,
        "timm_model": enc.name,
        "kwargs": enc.kwargs,
        "weights": str(out_path.resolve()),
        **{k: v for k, v in enc.meta.items() if k not in ("format", "arch")},
    }
    json_path.write_text(dump_json(spec, indent=2) + "\n")
    return out_path, json_path


# ------------------------------------------------------------------------ timm's hub format
HUB_CARD = "README.md"


def hub_architecture(arch: dict) -> str:
    """The registered timm name a hub export's ``config.json`` records: the entry of the
    encoder's own class and width (``vit_tiny_patch16_224`` for a 192-wide, 3-head MAE encoder,
    whatever its depth; with its patch and input size when timm registers that variant, e.g.
    ``vit_small_patch8_224``). timm registers BEiT only at base and large, so a tiny or small
    BEiT is recorded under ``beit_base_patch16_224``; ``model_args`` spell out its real shape
    either way, and the ``tokenmorph`` entry of the config names the size."""
    import timm

    family = timm_family(arch)
    width = (arch["embed_dim"], arch["num_heads"])  # timm's size names are widths
    size = next((n for n, (d, _, h) in STUDENT_SIZES.items() if (d, h) == width), "base")
    if family == "beit" and size not in ("base", "large"):
        size = "base"
    p, side = arch["patch_size"], arch["img_size"]
    for name in (f"{family}_{size}_patch{p}_{side}", f"{family}_{size}_patch{p}_224"):
        if timm.is_model(name):
            return name
    return f"{family}_{size}_patch16_224"


def _check_folder(out_dir: Path, force: bool) -> None:
    """``ConfigError`` before any work for an output that is a file, a non-empty folder that is
    not an export (never replaced), an export (without ``force``), or not writable."""
    if out_dir.suffix in (".pt", ".pth", ".bin", ".ckpt", ".json", ".safetensors"):
        raise ConfigError(
            f"{out_dir}: give a folder for timm's hub format, or a .safetensors file for the "
            "older format"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a folder name for the hub export")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / HUB_CONFIG).is_file():
            raise ConfigError(
                f"{out_dir} is a folder that is not an export; give a new or empty folder"
            )
        if not force:
            raise ConfigError(f"{out_dir} holds an export; pass --force to replace it")
    _check_writable(out_dir)


def _model_card(name: str, meta: dict) -> str:
    """The README.md of a hub export: what it is and the one call that loads it."""
    size = f"{meta['embed_dim']} wide, {meta['depth']} blocks, {meta['num_heads']} heads"
    return f"""---
library_name: timm
tags:
- image-feature-extraction
- timm
- tokenmorph
---
# tokenmorph {meta["framework"]} {meta["student_size"]} encoder

Student encoder of a tokenmorph pre-training run ({meta["framework"]} framework, teacher
{meta["teacher"]}), step {meta["step"]}: a timm `{name}` class built with its own shape
({size}, patch {meta["patch_size"]}, {meta["img_size"]} px input; `model_args` in config.json).

```python
import timm
model = timm.create_model("hf-hub:REPO", pretrained=True)   # or "local-dir:FOLDER"
cfg = timm.data.resolve_data_config(model=model)            # input size, mean and std
tokens = model.forward_features(x)                          # (B, 1 + N, D)
```

{meta["features"]}. Pooling: `global_pool={meta["global_pool"]!r}`.
"""


def export_hub(
    ckpt_or_run_dir: str | Path,
    out_dir: str | Path,
    global_pool: str = "avg",
    force: bool = False,
) -> Path:
    """Write the student encoder of a pre-training checkpoint in timm's hub format: a folder with
    ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with the input size and
    mean/std, and a ``tokenmorph`` entry recording where it came from), ``model.safetensors`` and
    a ``README.md`` model card, written by timm's own ``save_for_hf``.
    ``timm.create_model("local-dir:OUT", pretrained=True)`` (or ``"hf-hub:REPO"`` once pushed)
    loads it strictly with no other argument, and its ``forward_features`` equals tokenmorph's
    encoder on inputs normalised with the recorded mean/std.

    The folder is written next to its final place and renamed into it, so a crash leaves no
    half-export; files get the group-readable mode of anything else we write.

    Raises: as :func:`export_encoder` (``ConfigError`` for an output that is a file, a
    non-empty folder that is not an export, or an export without ``force``).
    """
    import shutil

    import timm
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    _check_folder(out_dir, force)
    enc = _encoder_of(ckpt_or_run_dir, global_pool)
    name = hub_architecture(enc.meta["arch"])
    kwargs = {k: v for k, v in enc.kwargs.items() if k != "pretrained_cfg"}
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(enc.state, strict=True)
    # our own pretrained config, so that the registry entry's tag, license and class count do
    # not leak into the export (num_classes=0 equal to the model's: timm then loads strictly)
    model.pretrained_cfg = {
        "architecture": name,
        "tag": "tokenmorph",
        **enc.kwargs["pretrained_cfg"],
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_for_hf(
            model,
            str(tmp),
            model_config={"tokenmorph": enc.meta},
            safe_serialization=True,
        )
        (tmp / HUB_CARD).write_text(_model_card(name, enc.meta))
        for p in (tmp, *tmp.iterdir()):
            _readable(p)
        old = None
        if out_dir.exists():  # the export replaced (--force): moved aside, removed once replaced
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / "export")
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token=None) -> str:
    """Upload a hub export folder to the Hugging Face Hub repository ``repo_id`` (created if
    missing) with huggingface_hub; returns the repository id. Needs huggingface_hub and a
    network (and a token: ``token`` or the one ``huggingface-cli login`` saved)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError(
            "--push-to-hub needs huggingface_hub: pip install huggingface_hub"
        ) from None
    folder = Path(folder)
    if not (folder / HUB_CONFIG).is_file():
        raise ConfigError(f"{folder} is not a hub export (no {HUB_CONFIG}); export to a folder")
    api = HfApi(token=token, library_name="tokenmorph")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="tokenmorph export")
    except (OSError, ValueError) as e:  # offline, refused, bad repo id, no token
        raise ConfigError(
            f"cannot push {folder} to the hub repository {repo_id!r} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); the export itself is complete in {folder}"
        ) from None
    return repo


def timm_call(spec: dict, weights: str | Path, json_path: str | Path) -> str:
    """The one-line Python call that loads an export in timm (absolute paths: it works from any
    folder)."""
    weights, json_path = Path(weights).resolve(), Path(json_path).resolve()
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


def export_weights(json_path: Path, recipe: dict) -> Path:
    """The weights of an older-format export: the recorded path, or the file of that name next to
    the recipe when the pair was moved (recipes written before the path was absolute hold a bare
    name, which is the same thing)."""
    recorded = Path(recipe["weights"])
    if recorded.is_absolute() and recorded.is_file():
        return recorded
    return json_path.parent / recorded.name


def load_export(spec) -> ExportedEncoder:
    """Load an export (:func:`is_export`) in timm, strictly: a hub folder through
    ``timm.create_model("local-dir:DIR", pretrained=True)``, the older format through the
    documented ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` call."""
    import timm

    if is_hub_export(spec):
        return load_timm_source(f"local-dir:{spec}")
    json_path = export_recipe_path(spec)
    if json_path is None:
        raise CheckpointError(
            f"{spec} is not a tokenmorph export (a folder with {HUB_CONFIG}, or a .json recipe "
            f"with format {EXPORT_FORMAT} next to its .safetensors)"
        )
    recipe = json.loads(json_path.read_text())
    weights = export_weights(json_path, recipe)
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


def arch_of_timm_model(model) -> dict | None:
    """The tokenmorph architecture of a timm ``Beit`` or plain ``VisionTransformer`` (class
    token, no register tokens), or None for any other model: what fine-tuning and segmentation
    need to rebuild it. A ViT is recorded as the MAE framework's encoder (its timm class)."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, (Beit, VisionTransformer)):
        return None
    block = model.blocks[0]
    arch = dict(
        img_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
    )
    if isinstance(model, Beit):
        own = getattr(block.attn, "relative_position_bias_table", None) is not None
        shared = model.rel_pos_bias is not None
        gamma = getattr(block, "gamma_1", None)
        arch.update(
            framework="beit",
            init_values=float(gamma.mean()) if gamma is not None else None,
            rel_pos="both" if own and shared else "per_block" if own else "shared",
        )
        return arch
    if model.cls_token is None or getattr(model, "num_reg_tokens", 0):
        return None
    return {**arch, "framework": "mae"}


def load_timm_source(spec: str, pretrained: bool = True, **kwargs) -> ExportedEncoder:
    """A timm model from ``local-dir:DIR``, ``hf-hub:NAME`` or ``timm:NAME``, as an
    :class:`ExportedEncoder` (``arch`` from the tokenmorph entry of a hub export's config, else
    :func:`arch_of_timm_model`: None for models that are not a Beit or a plain ViT). ``kwargs``
    go to ``timm.create_model`` (``num_classes=0`` unless given). One-line ``ModelError`` when
    timm cannot build or download it."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    name = spec[len("timm:") :] if spec.startswith("timm:") else spec
    if name.startswith("local-dir:") and not Path(name[len("local-dir:") :]).is_dir():
        raise CheckpointError(f"{spec}: no such folder (local-dir:DIR names an export folder)")
    kwargs.setdefault("num_classes", 0)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # unknown names, offline downloads, weights that do not fit
        hint = "; without internet pass random_init" if not name.startswith("local-dir:") else ""
        raise ModelError(
            f"cannot build {spec} ({type(e).__name__}: {' '.join(str(e).split())[:200]}){hint}"
        ) from None
    cfg = model.pretrained_cfg
    meta = {}
    if name.startswith("local-dir:"):
        config = json.loads((Path(name[len("local-dir:") :]) / HUB_CONFIG).read_text())
        meta = config.get("tokenmorph", {}) if isinstance(config, dict) else {}
    arch = dict(meta["arch"]) if "arch" in meta and "img_size" not in kwargs else None
    arch = arch or arch_of_timm_model(model)
    mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    return ExportedEncoder(arch, model, tuple(mean), tuple(std), spec)
