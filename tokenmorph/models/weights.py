"""Weight files: reading a state dict from any common format, and loading it strictly into a
       model
with one-line errors that name the missing and unexpected keys."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["read_state_dict", "load_weights_strict", "one_line", "short_keys"]


def read_state_dict(path: str, what: str = "teacher weights") -> dict:
    """A state dict from a .safetensors, .pt/.pth (plain or wrapped in 'state_dict' / 'model') or
       a
    TorchScript archive (OpenAI's own CLIP files are TorchScript). ``what`` names the file in
    errors."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(
            f"{what} file not found: {path}; pass an existing .safetensors/.pt/.pth file"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        if zipfile.is_zipfile(p) and any(
            n.endswith("/constants.pkl") for n in zipfile.ZipFile(p).namelist()
        ):
            return torch.jit.load(str(p), map_location="cpu").state_dict()
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # any decoding failure is a bad file from the user's point of view
        raise ModelError(
            f"cannot read {what} {path} ({one_line(e)}); "
            "pass a .safetensors or torch state-dict file"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"{what} {path} hold a {type(sd).__name__}, not a state dict")
    return sd


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as 'Type: message' on one line, shortened."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def short_keys(keys: Sequence[str], n: int = 4) -> str:
    """The first ``n`` of ``keys`` (sorted), and how many there are in all."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights_strict(model: nn.Module, path: str, arch: str) -> None:
    """Load ``path`` into ``model`` strictly. OpenAI-layout CLIP dicts ('visual.*') go through
    timm's converter; classifier weights in the file are skipped when the model was built without
    a classifier."""
    sd = read_state_dict(path)
    for prefix in ("visual.", "module.visual."):
        if f"{prefix}class_embedding" in sd:
            from timm.models.vision_transformer import _convert_openai_clip

            sd = _convert_openai_clip(sd, model, prefix=prefix)
            break
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if classifier:
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        sd = {
            k: v
            for k, v in sd.items()
            if k in own or not k.startswith(tuple(h + "." for h in heads))
        }
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ModelError(
            f"weights {path} do not match {arch}: missing keys [{short_keys(missing)}], "
            f"unexpected keys [{short_keys(unexpected)}]; pass a state dict of this architecture"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ModelError(
            f"weights {path} do not fit {arch} ({one_line(e)}); "
            "pass a state dict of this architecture"
        ) from None
