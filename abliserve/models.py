"""Resolving a model argument to local weights, and the identity artifacts are checked against.

Users pass ``demo`` (the bundled model), a local checkpoint folder, or a Hugging Face id that is
already in the local Hugging Face cache. Nothing here reaches a hub: on an offline machine a hub
download would hang or fail obscurely, so an id that is not cached is a clear error instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from abliserve.directions.artifact import FINGERPRINT_ROWS, ModelIdentity, fingerprint_embedding
from abliserve.errors import UserError

DEMO = "demo"
SOURCE_FILE = "ABLISERVE_SOURCE"  # written by checkpoints abliserve builds: "<model id> from ..."
EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
)
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


def checkpoint_identity(checkpoint: Path, model_id: str | None = None) -> ModelIdentity:
    """Identity of a safetensors checkpoint on disk, without loading the model.

    Reads only the first rows of the embedding matrix, so both engines (and the vLLM front end,
    which never holds the weights itself) can check artifacts in milliseconds. A corrupt
    checkpoint (bad config.json, truncated or malformed safetensors) is one clear UserError here,
    before any model loads.
    """
    try:
        return _checkpoint_identity(checkpoint, model_id)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        if isinstance(error, UserError):
            raise
        raise ModelNotFoundError(
            f"model checkpoint {checkpoint} is unreadable or corrupt: "
            f"{type(error).__name__}: {error}"
        ) from None


def _checkpoint_identity(checkpoint: Path, model_id: str | None) -> ModelIdentity:
    config = read_config(checkpoint)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            stored = set(handle.keys())  # safe_open supports keys(), not `in`
            key = next((k for k in EMBEDDING_KEYS if k in stored), None)
            if key is None:
                continue
            embedding = handle.get_slice(key)
            fingerprint = fingerprint_embedding(
                embedding[:FINGERPRINT_ROWS], tuple(embedding.get_shape())
            )
            return ModelIdentity(
                model_id=model_id or model_display_id(checkpoint),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                fingerprint=fingerprint,
            )
    raise ModelNotFoundError(f"checkpoint {checkpoint} has no safetensors embedding matrix")
