"""Direction artifacts are data, never code: hostile files are refused with ArtifactError, and
loading never unpickles anything (docs/ARCHITECTURE.md, "The artifact format").

Each file here is crafted the way an attacker (or a broken disk) would: a pickle renamed
``.safetensors``, a header that lies about its size or a tensor's shape, integer tensors, NaN,
extra tensors, metadata of the wrong JSON type or with absurd dimensions, an oversized file.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from abliserve.directions import artifact as artifact_module
from abliserve.directions.artifact import (
    METADATA_KEY,
    ArtifactError,
    DirectionArtifact,
    ModelIdentity,
    load_artifact,
)

IDENTITY = ModelIdentity("tiny/llama", hidden_size=8, num_layers=2, fingerprint="ab" * 32)
SITES = 2 * IDENTITY.num_layers + 1


def good_tensors() -> dict[str, torch.Tensor]:
    directions = torch.zeros(SITES, IDENTITY.hidden_size)
    directions[:, 0] = 1.0
    return {"directions": directions, "weights": torch.ones(SITES)}


def good_metadata(**changes) -> dict:
    metadata = DirectionArtifact(**good_tensors(), model=IDENTITY).metadata()
    metadata.update(changes)
    return metadata


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: object) -> Path:
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


def raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    """A safetensors file written by hand, so the header can say anything."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


class Exploit:
    """Unpickling this object runs code: a marker that load_artifact never unpickles."""

    ran = False

    def __reduce__(self):
        return (setattr, (Exploit, "ran", True))


def test_good_file_loads(tmp_path: Path) -> None:
    loaded = load_artifact(write(tmp_path / "good.safetensors", good_tensors(), good_metadata()))
    assert loaded.model == IDENTITY


def test_pickle_renamed_safetensors_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"directions": Exploit()}))
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_artifact(path)
    assert not Exploit.ran


def test_torch_save_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "torch.safetensors"
    torch.save(good_tensors(), path)
    with pytest.raises(ArtifactError):
        load_artifact(path)


def test_loading_calls_no_unpickler(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path / "good.safetensors", good_tensors(), good_metadata())

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_artifact(path)


HOSTILE_HEADERS = {
    "header length beyond the file": lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"),
    "header length of 100 MB": lambda p: p.write_bytes(struct.pack("<Q", 100 * 2**20) + b"{}"),
    "huge declared shape": lambda p: raw_safetensors(
        p,
        {
            "directions": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]},
            "weights": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        },
        b"\x00" * 24,
    ),
    "offsets past the end": lambda p: raw_safetensors(
        p,
        {
            "directions": {"dtype": "F32", "shape": [SITES, 8], "data_offsets": [0, 4 * SITES * 8]},
            "weights": {"dtype": "F32", "shape": [SITES], "data_offsets": [160, 180]},
        },
        b"\x00" * 8,
    ),
    "header not JSON": lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[" + b"\x00" * 8),
}


@pytest.mark.parametrize("kind", HOSTILE_HEADERS)
def test_hostile_safetensors_headers_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "hostile.safetensors"
    HOSTILE_HEADERS[kind](path)
    with pytest.raises(ArtifactError):
        load_artifact(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_tensors_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {name: t.to(dtype) for name, t in good_tensors().items()}
    path = write(tmp_path / "ints.safetensors", tensors, good_metadata())
    with pytest.raises(ArtifactError, match="floating point"):
        load_artifact(path)


def test_extra_tensors_are_refused(tmp_path: Path) -> None:
    tensors = {**good_tensors(), "payload": torch.zeros(4)}
    path = write(tmp_path / "extra.safetensors", tensors, good_metadata())
    with pytest.raises(ArtifactError, match="expected exactly"):
        load_artifact(path)


@pytest.mark.parametrize(
    "metadata",
    [
        [1, 2, 3],
        "a string",
        None,
        good_metadata(method="not an object"),
        good_metadata(scores=[1, 2]),
        good_metadata(model={"model_id": "x"}),
        good_metadata(model="x"),
        good_metadata(model={**good_metadata()["model"], "hidden_size": "wide"}),
        good_metadata(format_version=99),
    ],
    ids=lambda m: json.dumps(m)[:40],
)
def test_malformed_metadata_is_refused(tmp_path: Path, metadata: object) -> None:
    path = write(tmp_path / "meta.safetensors", good_tensors(), metadata)
    with pytest.raises(ArtifactError):
        load_artifact(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "dimensions",
    [
        {"num_layers": 10**9},
        {"num_layers": -3},
        {"hidden_size": 10**12},
        {"hidden_size": 0},
    ],
)
def test_absurd_model_dimensions_are_refused_quickly(tmp_path: Path, dimensions: dict) -> None:
    """A header claiming a billion layers must fail fast, not build a billion site names."""
    metadata = good_metadata()
    metadata["model"] = {**metadata["model"], **dimensions}
    path = write(tmp_path / "absurd.safetensors", good_tensors(), metadata)
    with pytest.raises(ArtifactError):
        load_artifact(path)


def test_oversized_file_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path / "big.safetensors", good_tensors(), good_metadata())
    monkeypatch.setattr(artifact_module, "MAX_ARTIFACT_BYTES", path.stat().st_size - 1)
    with pytest.raises(ArtifactError, match="over the"):
        load_artifact(path)


@pytest.mark.parametrize("kind", ["missing", "directory", "device"])
def test_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = {"missing": tmp_path / "nope.safetensors", "directory": tmp_path}.get(
        kind, Path("/dev/zero")
    )
    with pytest.raises(ArtifactError, match="not a file"):
        load_artifact(path)


# -- hostile metadata and weights (found by an adversarial review) -----------------------------


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def deep_metadata_text(depth: int) -> str:
    """Metadata JSON whose ``scores`` holds ``depth`` nested lists (built as text: json.dumps
    itself would recurse too deep)."""
    text = json.dumps(good_metadata(scores={"deep": "HOLE"}))
    return text.replace('"HOLE"', "[" * depth + "]" * depth)


HOSTILE_METADATA = {
    "scores nested 900 deep": lambda: deep_metadata_text(900),
    "metadata nested 100k deep": lambda: deep_metadata_text(100_000),
    "metadata over 64 KiB": lambda: json.dumps(good_metadata(method={"pad": "x" * 70_000})),
    "NaN in scores": lambda: json.dumps(good_metadata(scores={"kl": math.nan})),
    "infinity in method": lambda: json.dumps(good_metadata(method={"alpha": math.inf})),
    "overlong string in datasets": lambda: json.dumps(good_metadata(datasets={"a": "x" * 5000})),
    "ANSI escape in model_id": lambda: json.dumps(
        good_metadata(model={**good_metadata()["model"], "model_id": "\x1b[2J\x1b[31mevil"})
    ),
    "hidden size as text": lambda: json.dumps(
        good_metadata(model={**good_metadata()["model"], "hidden_size": "8"})
    ),
    "layer count as float": lambda: json.dumps(
        good_metadata(model={**good_metadata()["model"], "num_layers": 2.0})
    ),
    "fingerprint not text": lambda: json.dumps(
        good_metadata(model={**good_metadata()["model"], "fingerprint": ["ab"]})
    ),
}


@pytest.mark.parametrize("case", HOSTILE_METADATA)
def test_hostile_metadata_is_one_artifact_error(tmp_path: Path, case: str) -> None:
    """Each used to load (then break GET /v1/directions, or print escapes raw) or crash the
    loader with RecursionError; now each is an ArtifactError whose message has no control
    characters."""
    path = tmp_path / "hostile.safetensors"
    save_file(good_tensors(), str(path), metadata={METADATA_KEY: HOSTILE_METADATA[case]()})
    with pytest.raises(ArtifactError) as raised:
        load_artifact(path)
    assert str(raised.value).isprintable()


@pytest.mark.parametrize(
    ("weight", "complaint"),
    [
        (float("nan"), "NaN or infinity"),
        (float("inf"), "NaN or infinity"),
        (1e30, "site weights must lie in"),
        (-0.5, "site weights must lie in"),
        (artifact_module.MAX_SITE_WEIGHT + 0.01, "site weights must lie in"),
    ],
)
def test_site_weights_not_finite_or_outside_their_range_are_refused(
    tmp_path: Path, weight: float, complaint: str
) -> None:
    tensors = good_tensors()
    tensors["weights"][1] = weight
    path = write(tmp_path / "weights.safetensors", tensors, good_metadata())
    with pytest.raises(ArtifactError, match=complaint):
        load_artifact(path)


def test_site_weights_up_to_the_maximum_load(tmp_path: Path) -> None:
    tensors = good_tensors()
    tensors["weights"][:] = artifact_module.MAX_SITE_WEIGHT
    assert load_artifact(write(tmp_path / "max.safetensors", tensors, good_metadata()))
