"""The formats of what ``tokenmorph export`` writes, and telling them apart from other
backbone names, without loading anything: timm's hub folder (``config.json`` + weights), the
older ``.safetensors`` + ``.json`` recipe pair, and the prefixes of timm's model sources."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "EXPORT_FORMAT",
    "HUB_CONFIG",
    "TIMM_PREFIXES",
    "export_recipe_path",
    "is_export",
    "is_hub_export",
]

EXPORT_FORMAT = "tokenmorph-timm-export-v1"  # the older format's recipe
HUB_CONFIG = "config.json"
TIMM_PREFIXES = ("timm:", "hf-hub:", "local-dir:")


def export_recipe_path(spec) -> Path | None:
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


def is_hub_export(spec) -> bool:
    """Whether ``spec`` is a folder in timm's hub format (a ``config.json`` and weights)."""
    path = Path(spec)
    return path.is_dir() and (path / HUB_CONFIG).is_file()


def is_export(spec) -> bool:
    """Whether ``spec`` names a ``tokenmorph export``: a hub folder, or the .json or
    .safetensors of the older format."""
    return is_hub_export(spec) or export_recipe_path(spec) is not None
