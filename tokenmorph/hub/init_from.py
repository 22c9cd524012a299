"""Starting a pre-training student from published weights (``init_from``): one reader per
layout, one loader for all of them.

:func:`read_init_source` turns ``init_from`` into an :class:`InitSource`, the weights in the
student's key names:

* a tokenmorph pre-training checkpoint file or run folder (its newest readable checkpoint), or
  ``dtm-release:FILE``: the student's own keys;
* a ``tokenmorph export`` (its .json or .safetensors): the timm encoder, under ``encoder.``;
* an official MAE checkpoint (``mae_pretrain_vit_*.pth``, encoder only, or
  ``mae_visualize_vit_*.pth`` with the decoder):
  :func:`~tokenmorph.models.layouts.mae_to_student`;
* a DTM release ``checkpoint-*.pth`` (recognised by its ``lm_head``):
  :func:`~tokenmorph.models.layouts.dtm_release_to_student`;
* ``timm:NAME`` (``timm:local-dir:DIR``, ``timm:hf-hub:ID``) or ``local-dir:DIR``: the model timm
  builds with its pretrained weights and no classifier, under ``encoder.``.

:func:`load_into_student` fits a source to a student and loads it. The encoder must be filled
entirely; the other parts are groups loaded when the source has them (BEiT framework: the mask
token; MAE: the decoder with its mask token), each then complete, and the prediction layer
(``head`` / ``decoder_pred``), which is loaded when its width fits and otherwise starts fresh
(another teacher's targets are another space: nothing of them carries over). On the way a BEiT
source's relative position tables are converted to the student's layout (the same function,
:func:`~tokenmorph.models.layouts.to_rel_pos_layout`) and, as fine-tuning does, position
embeddings, bias tables and patch kernels of another grid or patch size are resampled by timm's
checkpoint filters (bicubic; an MAE student's fixed sin-cos tables then hold the resampled
source table, as MAE's fine-tuning interpolates it, not the sin-cos of the new grid). Missing
keys, unexpected keys and shapes that still differ are named in one line and refused;
``strict=False`` loads what fits and reports the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ModelError
from ..models.arch import framework_of
from ..models.layouts import (
    dtm_release_to_student,
    mae_decoder_keys,
    mae_layout,
    mae_to_student,
    rel_pos_layout,
    to_rel_pos_layout,
)
from ..models.weights import one_line, read_state_dict, short_keys
from ..runtime.checkpoints import CHECKPOINT_FORMAT
from .export import is_export, load_export
from .formats import is_hub_export
from .release_weights import DTM_RELEASE_PREFIX, read_release_file

__all__ = ["InitSource", "read_init_source", "load_into_student", "init_student"]

_TIMM_PREFIXES = ("timm:", "local-dir:", "hf-hub:")
_FAMILY_FRAMEWORK = {"Beit": "beit", "VisionTransformer": "mae"}


@dataclass
class InitSource:
    """Weights to start a student from: ``state`` in the student's key names, the ``framework``
    whose student they fit ("beit" or "mae"), and ``layout``, what the file was (for messages)."""

    spec: str
    layout: str
    framework: str
    state: dict


def _encoder_source(spec: str, layout: str, model: nn.Module) -> InitSource:
    framework = _FAMILY_FRAMEWORK.get(type(model).__name__)
    if framework is None:
        raise CheckpointError(
            f"{spec} is a timm {type(model).__name__}; a student starts from a Beit "
            "(framework=beit) or a VisionTransformer (framework=mae) encoder"
        )
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    return InitSource(spec, layout, framework, state)


def _timm_source(spec: str) -> InitSource:
    import timm

    name = spec[len("timm:") :] if spec.startswith("timm:") else spec
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # timm raises many types (no network, unknown name, bad folder)
        raise CheckpointError(
            f"init_from={spec}: timm cannot build {name} with its weights ({one_line(e, 200)}); "
            "without internet, save the model with timm.models.save_for_hf and pass local-dir:DIR"
        ) from None
    return _encoder_source(spec, f"timm {type(model).__name__}", model)


def _tokenmorph_source(spec: str) -> InitSource:
    from .backbone import load_pretrain_checkpoint

    ckpt, path, record = load_pretrain_checkpoint(spec, "init_from")
    what = "DTM release checkpoint" if spec.startswith(DTM_RELEASE_PREFIX) else "checkpoint"
    step = f", step {record.step}" if record.step is not None else ""
    return InitSource(str(path), f"tokenmorph {what}{step}", record.framework, dict(ckpt["model"]))


def _file_source(spec: str, path: Path) -> InitSource:
    """A weights file: a tokenmorph checkpoint, or an official MAE or DTM release file."""
    if path.suffix == ".safetensors":
        try:
            state = read_state_dict(str(path), "init_from")
        except ModelError as e:
            raise CheckpointError(str(e)) from None
    else:
        try:
            state, extras = read_release_file(path)
        except CheckpointError:  # e.g. a tokenmorph checkpoint of an older format: its reader
            return _tokenmorph_source(str(path))
        if extras.get("format") == CHECKPOINT_FORMAT:
            return _tokenmorph_source(str(path))
    if "lm_head.weight" in state:  # before MAE's test: a DTM state also has a mask token
        mapped, _ = dtm_release_to_student(state)
        return InitSource(spec, "DTM release layout", "beit", mapped)
    layout = mae_layout(state)
    if layout is not None:
        return InitSource(spec, f"MAE {layout} layout", "mae", mae_to_student(state))
    raise CheckpointError(
        f"init_from={spec}: not a layout tokenmorph reads (first keys: "
        f"{short_keys(list(state))}); give a tokenmorph checkpoint, run folder or export, an "
        "official MAE or DTM release checkpoint, timm:NAME or local-dir:DIR"
    )


def _written_by_tokenmorph(folder: Path) -> bool:
    """Whether a hub folder's ``config.json`` carries the ``tokenmorph`` entry of our export."""
    try:
        return "tokenmorph" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def read_init_source(spec: str) -> InitSource:
    """The weights ``init_from`` names, in the student's key names (see the module docstring);
    ``CheckpointError`` naming the value for anything else."""
    spec = str(spec)
    if spec.startswith(_TIMM_PREFIXES):
        return _timm_source(spec)
    if spec.startswith(DTM_RELEASE_PREFIX):
        return _tokenmorph_source(spec)
    if is_hub_export(spec) and not _written_by_tokenmorph(Path(spec)):
        return _timm_source(f"local-dir:{Path(spec).expanduser()}")  # timm's save_for_hf folder
    if is_export(spec):
        exported = load_export(spec)
        return _encoder_source(exported.source, "tokenmorph export", exported.encoder)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
            return _timm_source(f"local-dir:{path}")  # a timm hub folder (save_for_hf)
        return _tokenmorph_source(str(path))
    if not path.is_file():
        raise CheckpointError(
            f"init_from={spec} does not exist; give a checkpoint, run folder, export, official "
            "MAE or DTM release file, timm:NAME or local-dir:DIR"
        )
    return _file_source(spec, path)


# ------------------------------------------------------------------------------------ loading
def _groups(student: nn.Module, keys) -> dict[str, list[str]]:
    """The student's keys by part: "encoder" (required), the optional groups, "prediction"."""
    keys = list(keys)
    if framework_of(student.arch) == "mae":
        pred = [k for k in keys if k.startswith("decoder_pred.")]
        decoder = [k for k in mae_decoder_keys(keys) if k not in pred]
        optional = {"decoder and mask token": decoder}
    else:
        pred = [k for k in keys if k.startswith("head.")]
        optional = {"mask token": [k for k in keys if k == "mask_token"]}
    encoder = [k for k in keys if k.startswith("encoder.")]
    rest = set(keys) - set(encoder) - set(pred) - {k for v in optional.values() for k in v}
    if rest:  # a part no group knows would never be checked
        raise CheckpointError(f"student keys outside every group: {short_keys(sorted(rest))}")
    return {"encoder": encoder, **optional, "prediction": pred}


def _fits(value: torch.Tensor, own: torch.Tensor) -> bool:
    return tuple(value.shape) == tuple(own.shape)


def _resample(student: nn.Module, state: dict, own: dict) -> list[str]:
    """Resample, in ``state`` (in place), the encoder entries of another grid or patch size with
    timm's checkpoint filter of the encoder's family (fine-tuning's rule), and an MAE decoder's
    position table with timm's ``resample_abs_pos_embed``; entries whose other dimensions differ
    are left as they are. Returns the keys resampled."""
    from timm.layers import resample_abs_pos_embed

    if framework_of(student.arch) == "mae":
        from timm.models.vision_transformer import checkpoint_filter_fn
    else:
        from timm.models.beit import checkpoint_filter_fn

    spatial = {}
    for k, v in state.items():
        if k not in own or _fits(v, own[k]) or v.dim() != own[k].dim():
            continue
        if k.endswith(("pos_embed", "relative_position_bias_table")):
            same = v.shape[-1] == own[k].shape[-1]  # the width / the heads
        else:
            same = k.endswith("patch_embed.proj.weight") and v.shape[:2] == own[k].shape[:2]
        if same:
            spatial[k] = v
    done = []
    encoder = {k[len("encoder.") :]: v for k, v in spatial.items() if k.startswith("encoder.")}
    if encoder:
        try:
            for k, v in checkpoint_filter_fn(encoder, student.encoder).items():
                state[f"encoder.{k}"] = v
        except Exception as e:  # the filter could not resample: the shapes are reported below
            raise CheckpointError(f"cannot resample {', '.join(encoder)} ({one_line(e)})") from None
    if "decoder_pos_embed" in spatial:
        state["decoder_pos_embed"] = resample_abs_pos_embed(
            spatial["decoder_pos_embed"], list(student.grid), num_prefix_tokens=1
        )
    for k in spatial:
        if _fits(state[k], own[k]):
            done.append(k)
    return done


def load_into_student(student: nn.Module, source: InitSource, strict: bool = True) -> str:
    """Fit ``source`` to ``student`` and load it (see the module docstring); returns a one-line
    description of what was loaded, converted, resampled and left fresh.

    Raises:
        CheckpointError: a source of the other framework; with ``strict``, any missing or
            unexpected key or shape that still differs, named.
    """
    framework = framework_of(student.arch)
    where = f"{source.spec} ({source.layout})"
    if source.framework != framework:
        raise CheckpointError(
            f"{where} holds a framework={source.framework} student's weights; this student is "
            f"framework={framework}: set framework={source.framework}"
        )
    own = student.state_dict()
    state = dict(source.state)
    notes = []
    if framework == "beit":
        depth = student.arch["depth"]
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        before = rel_pos_layout(enc, depth)
        enc, changed = to_rel_pos_layout(enc, depth, student.arch["rel_pos"])
        if changed:
            state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
            state.update({f"encoder.{k}": v for k, v in enc.items()})
            notes.append(f"relative position tables {before} -> {student.arch['rel_pos']}")
    resampled = _resample(student, state, own)
    if resampled:
        notes.append(f"resampled to the student's grid: {short_keys(resampled)}")
    groups = _groups(student, own)
    missing, load, fresh = [], {}, []
    for name, keys in groups.items():
        present = [k for k in keys if k in state]
        if (
            name == "prediction"
            and present
            and not all(k in state and _fits(state[k], own[k]) for k in keys)
        ):
            shape = tuple(state[present[0]].shape)
            notes.append(
                f"prediction layer {present[0]} {shape} vs {tuple(own[present[0]].shape)} in "
                "the student (other targets): initialised fresh"
            )
            continue
        if name != "encoder" and not present:
            if name == "prediction" and fresh and framework == "mae":
                fresh[-1] = (fresh[-1][0], fresh[-1][1] + len(keys))  # part of the decoder
            elif keys:
                fresh.append((name if name != "prediction" else "prediction layer", len(keys)))
            continue
        missing += [k for k in keys if k not in state]
        load.update({k: state[k] for k in present})
    unexpected = sorted(k for k in state if k not in own)
    bad = [k for k, v in load.items() if not _fits(v, own[k])]
    if (missing or unexpected or bad) and strict:
        shapes = "; ".join(f"{k} {tuple(load[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:3])
        raise CheckpointError(
            f"{where} does not fit the student: missing keys [{short_keys(missing)}], "
            f"unexpected keys [{short_keys(unexpected)}]"
            + (f", other shapes (file vs student): {shapes}" if bad else "")
            + "; build the student with the source's shape (model, depth, img_size, patch_size, "
            "decoder) or set init_strict=false to load what fits"
        )
    for k in bad:
        del load[k]
    student.load_state_dict(load, strict=False)  # exactly the keys checked above
    if fresh:
        names = ", ".join(name for name, _ in fresh)
        notes.append(f"{names} initialised fresh ({sum(n for _, n in fresh)} tensors)")
    if missing or unexpected or bad:
        notes.append(
            f"init_strict=false: left fresh [{short_keys(missing + bad)}], ignored "
            f"[{short_keys(unexpected)}]"
        )
    tail = "".join(f"; {n}" for n in notes)
    return f"{where}: {len(load)} tensors{tail}"


def init_student(student: nn.Module, spec: str, strict: bool = True) -> str:
    """Load ``init_from=spec`` into ``student`` (:func:`read_init_source`, then
    :func:`load_into_student`); returns what was done, in one line."""
    return load_into_student(student, read_init_source(spec), strict)
