"""Read a model folder's ``config.json`` as a plain dict (no transformers import, no remote code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import ModelError

CONFIG_FILE = "config.json"


def read_config(folder: str | Path) -> dict[str, Any]:
    """Return the parsed ``config.json`` of ``folder``; a one-line ``ModelError`` names what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder} (expected a local Hugging Face model folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{path}: file not found (a model folder needs its config.json)")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path``; a one-line ``ModelError`` if it is not one."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
