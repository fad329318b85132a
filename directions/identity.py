"""The identity of a checkpoint on disk, which direction artifacts are checked against.

It lives with the artifacts (not in the core's :mod:`abliserve.models`) because it is their
notion: the core resolves and loads models, and knows nothing of directions.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from abliserve.directions.artifact import FINGERPRINT_ROWS, ModelIdentity, fingerprint_embedding
from abliserve.errors import UserError
from abliserve.models import ModelNotFoundError, model_display_id, read_config

EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
)


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
