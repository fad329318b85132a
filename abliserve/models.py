"""Resolving a model argument to local weights (a checkpoint's identity, which direction artifacts
are checked against, is :mod:`abliserve.directions.identity`).

Users pass ``demo`` (the bundled model), a local checkpoint folder, or a Hugging Face id that is
already in the local Hugging Face cache. Nothing here reaches a hub: on an offline machine a hub
download would hang or fail obscurely, so an id that is not cached is a clear error instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliserve.errors import UserError

DEMO = "demo"
SOURCE_FILE = "ABLISERVE_SOURCE"  # written by checkpoints abliserve builds: "<model id> from ..."
# GPT-2 / GPT-NeoX era configs name the sizes differently; read_config adds the modern keys.
CONFIG_ALIASES = {"hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",)}


class ModelNotFoundError(UserError, FileNotFoundError):
    """The model argument names no usable local checkpoint."""


def resolve_model(spec: str) -> Path:
    """Map ``demo`` / a folder / a cached hub id to a local checkpoint folder."""
    if spec == DEMO:
        from abliserve.demo_model import provision_demo_model

        return provision_demo_model()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model path {path} has no config.json (not a checkpoint)")
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception as error:  # the hub client raises several unrelated types here
            raise ModelNotFoundError(
                f"model {spec!r} is not a local folder and not in the Hugging Face cache "
                f"(no hub download is attempted): {type(error).__name__}"
            ) from None
    raise ModelNotFoundError(f"model path {spec} does not exist")


def read_config(checkpoint: Path) -> dict:
    """The text model's config.json entries, with ``hidden_size`` and ``num_hidden_layers``."""
    config = json.loads((checkpoint / "config.json").read_text())
    for key, aliases in CONFIG_ALIASES.items():
        for alias in aliases:
            if key not in config and alias in config:
                config[key] = config[alias]
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def model_display_id(checkpoint: Path) -> str:
    """The name a checkpoint goes by: its recorded hub id, else the folder name."""
    source = checkpoint / SOURCE_FILE
    if source.is_file():
        return source.read_text().split()[0]
    config = json.loads((checkpoint / "config.json").read_text())
    name = config.get("_name_or_path") or config.get("name_or_path")
    return str(name) if name and not str(name).startswith("/") else checkpoint.name
