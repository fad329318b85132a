"""Start ``abliserve serve`` as a real subprocess on a free localhost port, for server tests.

A subprocess (not an in-process app) is what users run: it proves the CLI, the lifespan and
uvicorn together, and a crash in it cannot take the test process down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from reliability_harness import served


@contextmanager
def running_server(*args: str, log_path: Path) -> Iterator[str]:
    """Run ``abliserve serve ARGS`` and yield its base URL once /health answers (the API tests
    need only the URL; :func:`reliability_harness.served` also exposes the process)."""
    with served(*args, "--log-level", "warning", log_path=log_path) as server:
        yield server.url


def tiny_server_args(checkpoint: Path, direction: Path, *extra: str) -> list[str]:
    """The flags every tiny-model API test serves with: the transformers engine, the model as
    "tiny", one direction named "refusal", then ``extra``."""
    return [
        "--model",
        str(checkpoint),
        "--engine",
        "transformers",
        "--served-model-name",
        "tiny",
        "--direction",
        f"refusal={direction}",
        *extra,
    ]


def tiny_direction(checkpoint: Path, path: Path, seed: int) -> Path:
    """A random unit direction per site for the tiny checkpoint, saved as an artifact."""
    from tiny_models import random_directions

    from abliserve.directions.artifact import DirectionArtifact
    from abliserve.directions.identity import checkpoint_identity

    identity = checkpoint_identity(checkpoint)
    sites = 2 * identity.num_layers + 1
    artifact = DirectionArtifact(
        directions=random_directions(sites, identity.hidden_size, seed=seed),
        weights=torch.ones(sites),
        model=identity,
        method={"name": "random", "seed": seed},
    )
    return artifact.save(path)
