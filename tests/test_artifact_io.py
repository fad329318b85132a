"""Direction artifacts: round trip, refusal to fit another model, clean failures on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import random_directions

from abliserve.directions.artifact import (
    ArtifactError,
    DirectionArtifact,
    ModelIdentity,
    load_artifact,
)
from abliserve.projection import site_names

IDENTITY = ModelIdentity("tiny/llama", hidden_size=32, num_layers=3, fingerprint="ab" * 32)
SITES = len(site_names(3))


def make_artifact(identity: ModelIdentity = IDENTITY) -> DirectionArtifact:
    directions = random_directions(SITES, identity.hidden_size)
    directions[0] = 0  # a site left alone
    return DirectionArtifact(
        directions=directions,
        weights=torch.linspace(0, 1, SITES),
        model=identity,
        method={"name": "diff-of-means", "layer": 1},
        datasets={"harmful_train": {"sha256": "00", "count": 4}},
        scores={"chosen": {"layer": 1, "kl": 0.05}},
    )


def test_round_trip(tmp_path: Path) -> None:
    artifact = make_artifact()
    loaded = load_artifact(artifact.save(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.directions, artifact.directions)
    assert torch.equal(loaded.weights, artifact.weights)
    assert loaded.model == artifact.model
    assert loaded.metadata() == artifact.metadata()
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize(
    ("other", "problem"),
    [
        (ModelIdentity("other/wide", 64, 3, IDENTITY.fingerprint), "hidden size 32 != 64"),
        (ModelIdentity("other/deep", 32, 5, IDENTITY.fingerprint), "layer count 3 != 5"),
        (ModelIdentity("other/tuned", 32, 3, "cd" * 32), "weights fingerprint differs"),
    ],
)
def test_artifact_for_another_model_is_refused(other: ModelIdentity, problem: str) -> None:
    with pytest.raises(ArtifactError) as error:
        make_artifact().check_fits(other)
    message = str(error.value)
    assert "tiny/llama" in message and other.model_id in message and problem in message


def test_fits_its_own_model() -> None:
    make_artifact().check_fits(IDENTITY)


def corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = make_artifact().save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    files = {
        "empty": b"",
        "garbage": b"\x00\x01not a safetensors file" * 10,
        "truncated": data[: len(data) // 2],
        "header only": data[:64],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        paths[name].write_bytes(content)
    extra = tmp_path / "extra.safetensors"
    save_file(
        {
            "directions": torch.zeros(SITES, 32),
            "weights": torch.ones(SITES),
            "payload": torch.ones(1),
        },
        extra,
        metadata={"abliserve": "{}"},
    )
    paths["extra tensor"] = extra
    no_meta = tmp_path / "no_meta.safetensors"
    save_file({"directions": torch.zeros(SITES, 32), "weights": torch.ones(SITES)}, no_meta)
    paths["no metadata"] = no_meta
    not_unit = tmp_path / "not_unit.safetensors"
    artifact = make_artifact()
    save_file(
        {"directions": artifact.directions * 2, "weights": artifact.weights},
        not_unit,
        metadata={"abliserve": json.dumps(artifact.metadata())},
    )
    paths["not unit"] = not_unit
    nan = tmp_path / "nan.safetensors"
    weights = artifact.weights.clone()
    weights[3] = float("nan")
    save_file(
        {"directions": artifact.directions, "weights": weights},
        nan,
        metadata={"abliserve": json.dumps(artifact.metadata())},
    )
    paths["nan"] = nan
    return paths


def test_bad_files_fail_cleanly(tmp_path: Path) -> None:
    for name, path in corrupt_files(tmp_path).items():
        with pytest.raises(ArtifactError) as error:
            load_artifact(path)
        assert str(path) in str(error.value), name
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "missing.safetensors")


def test_wrong_shapes_are_rejected() -> None:
    with pytest.raises(ArtifactError, match="shape"):
        DirectionArtifact(torch.zeros(SITES - 1, 32), torch.ones(SITES - 1), IDENTITY)
