"""Direction artifacts: one ``.safetensors`` file holding the per-site directions and weights,
with JSON metadata in the safetensors header (docs/ARCHITECTURE.md).

An artifact is data, never code: it is read with ``safetensors`` (no pickle), its size is
bounded, and every tensor is validated (shape, finiteness, unit rows) before anything uses it.

Layout (S = 2 * num_layers + 1 canonical sites, see :mod:`abliserve.projection`):

    directions  float32 [S, hidden]  unit row per site, or a zero row (site untouched)
    weights     float32 [S]          per-site strength multiplier in [0, MAX_SITE_WEIGHT];
                                     the effective strength at a site is alpha * w
    metadata    JSON under the header key ``abliserve``: model identity and fingerprint,
                hidden size, layer count, method and parameters, dataset hashes, scores.

Metadata is bounded too (size, nesting, string length, finite numbers, printable identity
strings): it reaches ``GET /v1/directions`` and error lines, so a hostile file must fail here,
at start-up, as one line, and never later as a 500, a recursion error or terminal escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from abliserve.errors import UserError
from abliserve.projection import site_names

FORMAT_VERSION = 1
METADATA_KEY = "abliserve"
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024  # a 128-layer, 16k-wide model needs ~17 MB
UNIT_NORM_TOLERANCE = 1e-3
FINGERPRINT_ROWS = 256
MAX_LAYERS = 1024  # metadata beyond these bounds is hostile or corrupt, never a real model
MAX_HIDDEN_SIZE = 1 << 17
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_SITE_WEIGHT = 2.0  # 1 removes the direction at strength 1; 2 reflects it; more is hostile
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 8  # nesting of method / datasets / scores
MAX_METADATA_TEXT = 4096  # characters of any one metadata string
MAX_IDENTITY_TEXT = 256  # model_id, revision, fingerprint


class ArtifactError(UserError, ValueError):
    """An artifact that cannot be read, is malformed, or does not fit the model."""


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact must match: the residual stream's shape and the weights' fingerprint."""

    model_id: str
    hidden_size: int
    num_layers: int
    fingerprint: str
    revision: str | None = None

    def describe(self) -> str:
        return (
            f"'{self.model_id}' (hidden size {self.hidden_size}, {self.num_layers} layers, "
            f"weights fingerprint {self.fingerprint[:16]})"
        )


@dataclass
class DirectionArtifact:
    """A refusal direction (or one per site) and the facts needed to use it safely."""

    directions: torch.Tensor
    weights: torch.Tensor
    model: ModelIdentity
    method: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate_tensors(self.directions, self.weights, self.model)

    @property
    def num_sites(self) -> int:
        return self.directions.shape[0]

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": {
                "model_id": self.model.model_id,
                "revision": self.model.revision,
                "hidden_size": self.model.hidden_size,
                "num_layers": self.model.num_layers,
                "fingerprint": self.model.fingerprint,
            },
            "method": self.method,
            "datasets": self.datasets,
            "scores": self.scores,
        }

    def check_fits(self, model: ModelIdentity, artifact_name: str = "direction") -> None:
        """Refuse to run on a model this artifact was not computed for (docs/MATHS.md)."""
        mine = self.model
        problems = []
        if mine.hidden_size != model.hidden_size:
            problems.append(f"hidden size {mine.hidden_size} != {model.hidden_size}")
        if mine.num_layers != model.num_layers:
            problems.append(f"layer count {mine.num_layers} != {model.num_layers}")
        if mine.fingerprint != model.fingerprint:
            problems.append("weights fingerprint differs")
        if problems:
            raise ArtifactError(
                f"{artifact_name} artifact was computed for {mine.describe()} but the server "
                f"loaded {model.describe()}: {'; '.join(problems)}"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a crash never leaves a half-written file that looks valid."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "directions": self.directions.to(torch.float32).contiguous(),
            "weights": self.weights.to(torch.float32).contiguous(),
        }
        header = {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)}
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp_name, metadata=header)
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return path


def load_artifact(path: str | os.PathLike[str]) -> DirectionArtifact:
    """Read and validate an artifact; every failure is an :class:`ArtifactError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"direction artifact {path} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise ArtifactError(
            f"direction artifact {path} is {size} bytes, over the {MAX_ARTIFACT_BYTES}-byte limit"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            keys = set(handle.keys())
            if keys != {"directions", "weights"}:
                raise ArtifactError(
                    f"direction artifact {path} holds tensors {sorted(keys)}, "
                    "expected exactly ['directions', 'weights']"
                )
            directions = handle.get_tensor("directions")
            weights = handle.get_tensor("weights")
            bad_dtypes = {t.dtype for t in (directions, weights)} - set(FLOAT_DTYPES)
            if bad_dtypes:
                raise ArtifactError(
                    f"direction artifact {path} holds {sorted(map(str, bad_dtypes))} tensors; "
                    "directions and weights must be floating point"
                )
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ArtifactError(
            f"direction artifact {path} is not a valid safetensors file: {error}"
        ) from None
    try:
        raw = header[METADATA_KEY]
        if len(raw) > MAX_METADATA_BYTES:
            raise ArtifactError(
                f"direction artifact {path} metadata is {len(raw)} bytes, over the "
                f"{MAX_METADATA_BYTES}-byte limit"
            )
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ArtifactError(f"direction artifact {path} metadata is not a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"direction artifact {path} has an unknown format version (this abliserve "
                f"reads version {FORMAT_VERSION})"
            )
        model_meta = meta["model"]
        model = ModelIdentity(
            model_id=_identity_text(model_meta["model_id"], "model.model_id"),
            hidden_size=_count(model_meta["hidden_size"], "model.hidden_size"),
            num_layers=_count(model_meta["num_layers"], "model.num_layers"),
            fingerprint=_identity_text(model_meta["fingerprint"], "model.fingerprint"),
            revision=_identity_text(model_meta.get("revision"), "model.revision", optional=True),
        )
        extras = {name: meta.get(name) or {} for name in ("method", "datasets", "scores")}
        if not all(isinstance(value, dict) for value in extras.values()):
            raise ArtifactError(
                f"direction artifact {path}: method, datasets and scores must be JSON objects"
            )
        for name, value in extras.items():
            _check_json(value, name, 1)
    except ArtifactError as error:
        if str(error).startswith("direction artifact"):
            raise
        raise ArtifactError(f"direction artifact {path}: {error}") from None
    except RecursionError:
        raise ArtifactError(f"direction artifact {path} metadata is nested too deeply") from None
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as error:
        raise ArtifactError(
            f"direction artifact {path} has missing or malformed metadata: {error}"
        ) from None
    try:
        return DirectionArtifact(
            directions=directions.to(torch.float32),
            weights=weights.to(torch.float32),
            model=model,
            **extras,
        )
    except ArtifactError as error:
        raise ArtifactError(f"direction artifact {path}: {error}") from None


def _identity_text(value: object, field: str, optional: bool = False) -> str | None:
    """A model identity string: printable (it is printed in error lines) and short."""
    if value is None and optional:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= MAX_IDENTITY_TEXT):
        raise ArtifactError(f"metadata {field} must be a string of 1..{MAX_IDENTITY_TEXT} chars")
    if not value.isprintable():
        raise ArtifactError(f"metadata {field} holds control characters")
    return value


def _count(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArtifactError(f"metadata {field} must be an integer")
    return value


def _check_json(value: object, where: str, depth: int) -> None:
    """Plain JSON, at most MAX_METADATA_DEPTH deep, finite numbers, bounded strings: what
    ``GET /v1/directions`` can serialise for every request without failing."""
    if depth > MAX_METADATA_DEPTH:
        raise ArtifactError(f"metadata {where} is nested deeper than {MAX_METADATA_DEPTH}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, f"{where} key", depth)
            _check_json(item, f"{where}.{key}"[:80], depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, f"{where}[]", depth + 1)
    elif isinstance(value, str):
        if len(value) > MAX_METADATA_TEXT:
            raise ArtifactError(f"metadata {where} holds a string over {MAX_METADATA_TEXT} chars")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ArtifactError(f"metadata {where} holds NaN or infinity")
    elif not (value is None or isinstance(value, bool | int)):
        raise ArtifactError(f"metadata {where} holds a {type(value).__name__}")


def _validate_tensors(
    directions: torch.Tensor, weights: torch.Tensor, model: ModelIdentity
) -> None:
    if not (1 <= model.num_layers <= MAX_LAYERS and 1 <= model.hidden_size <= MAX_HIDDEN_SIZE):
        raise ArtifactError(
            f"model has {model.num_layers} layers and hidden size {model.hidden_size}; expected "
            f"1..{MAX_LAYERS} layers and hidden size 1..{MAX_HIDDEN_SIZE}"
        )
    expected_sites = len(site_names(model.num_layers))
    if directions.shape != (expected_sites, model.hidden_size):
        raise ArtifactError(
            f"directions tensor has shape {tuple(directions.shape)}, expected "
            f"({expected_sites}, {model.hidden_size}) for {model.num_layers} layers"
        )
    if weights.shape != (expected_sites,):
        raise ArtifactError(
            f"weights tensor has shape {tuple(weights.shape)}, expected ({expected_sites},)"
        )
    if not (torch.isfinite(directions).all() and torch.isfinite(weights).all()):
        raise ArtifactError("directions or weights contain NaN or infinity")
    if bool((weights < 0).any()) or bool((weights > MAX_SITE_WEIGHT).any()):
        raise ArtifactError(f"site weights must lie in [0, {MAX_SITE_WEIGHT}]")
    norms = directions.to(torch.float64).norm(dim=-1)
    bad = [
        i
        for i, n in enumerate(norms.tolist())
        if not (math.isclose(n, 1.0, abs_tol=UNIT_NORM_TOLERANCE) or n == 0.0)
    ]
    if bad:
        raise ArtifactError(f"direction rows {bad[:5]} are neither unit vectors nor zero")


def fingerprint_embedding(
    embedding: torch.Tensor, full_shape: tuple[int, ...] | None = None
) -> str:
    """A dtype-independent fingerprint of a model's weights, from its embedding matrix.

    Only the first ``FINGERPRINT_ROWS`` rows are read (pass just those plus ``full_shape`` to
    avoid loading the whole matrix). They are rounded to bfloat16 before hashing, so a checkpoint
    loaded as float32 or bfloat16 (both exact for bf16-stored weights) fingerprints the same;
    the shape is included so a resized vocabulary or hidden size differs.
    """
    shape = list(full_shape if full_shape is not None else embedding.shape)
    rows = embedding[:FINGERPRINT_ROWS].detach().to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256()
    digest.update(json.dumps(shape).encode())
    digest.update(rows.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
