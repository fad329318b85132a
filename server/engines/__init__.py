"""Engines behind the HTTP API, and the one place that picks and builds them.

``create_engine`` is deliberately small: each engine module exposes a class taking
``(checkpoint, identity, directions, **EngineOptions)``; ``auto`` prefers vLLM where its engine
module and vLLM itself import, and otherwise uses the transformers engine, which runs wherever
PyTorch does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from abliserve.architectures import WriterSpec
from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.errors import UserError
from abliserve.server.engines.base import Engine
from abliserve.server.engines.direction_slots import DEFAULT_MAX_DIRECTIONS

ENGINE_CHOICES = ("auto", "vllm", "transformers")
VLLM_ENGINE_MODULE = "abliserve.server.engines.vllm_engine"


@dataclass(frozen=True)
class EngineOptions:
    """Serving options every engine accepts (the ``serve`` flags of the same names)."""

    max_model_len: int | None = None
    max_num_seqs: int = 32
    dtype: str = "auto"
    writers: WriterSpec | None = None  # operator-named writers (--writers), else the rule
    max_directions: int = DEFAULT_MAX_DIRECTIONS  # bank slots, for directions loaded later too
    # vLLM-only engine arguments given on the command line (tensor_parallel_size, ...).
    vllm: dict[str, Any] = field(default_factory=dict)


def vllm_available() -> bool:
    """vLLM and abliserve's vLLM engine both importable (checked without importing them)."""
    try:
        return (
            importlib.util.find_spec("vllm") is not None
            and importlib.util.find_spec(VLLM_ENGINE_MODULE) is not None
        )
    except (ImportError, ValueError):
        return False


def resolve_engine_kind(kind: str) -> str:
    if kind not in ENGINE_CHOICES:
        raise UserError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {kind!r}")
    if kind == "auto":
        return "vllm" if vllm_available() else "transformers"
    if kind == "vllm" and not vllm_available():
        raise UserError("--engine vllm needs vLLM installed (pip install 'abliserve[vllm]')")
    return kind


def create_engine(
    kind: str,
    checkpoint: Path,
    identity: ModelIdentity,
    directions: dict[str, DirectionArtifact],
    options: EngineOptions,
) -> Engine:
    """Build (not start) the engine ``kind`` (``auto``, ``vllm`` or ``transformers``)."""
    kind = resolve_engine_kind(kind)
    common = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "vllm"}
    if kind == "vllm":
        module = importlib.import_module(VLLM_ENGINE_MODULE)
        return module.VllmEngine(checkpoint, identity, directions, **common, **options.vllm)
    from abliserve.server.engines.transformers_engine import TransformersEngine

    return TransformersEngine(checkpoint, identity, directions, **common)
