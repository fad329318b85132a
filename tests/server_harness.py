"""Start ``abliserve serve`` as a real subprocess on a free localhost port, for server tests.

A subprocess (not an in-process app) is what users run: it proves the CLI, the lifespan and
uvicorn together, and a crash in it cannot take the test process down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import tiny_models
import torch
from reliability_harness import Served, served


@contextmanager
def running_server(*args: str, log_path: Path) -> Iterator[str]:
    """Run ``abliserve serve ARGS`` and yield its base URL once /health answers (the API tests
    need only the URL; :func:`reliability_harness.served` also exposes the process)."""
    with served(*args, "--log-level", "warning", log_path=log_path) as server:
        yield server.url


@contextmanager
def tiny_served(folder: Path, *extra: str, num_layers: int = 2, seed: int = 1) -> Iterator[Served]:
    """Serve a new tiny random llama (``folder/model``) with a random direction seeded ``seed``
    (``folder/refusal.safetensors``), as :func:`tiny_server_args` names them, plus ``extra``
    flags; the log is ``folder/server.log``."""
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=num_layers, hidden=32)
    direction = tiny_direction(checkpoint, folder / "refusal.safetensors", seed=seed)
    args = tiny_server_args(checkpoint, direction, *extra)
    with served(*args, log_path=folder / "server.log") as server:
        yield server


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


async def chat_token_ids(
    client: httpx.AsyncClient, body: dict, headers: dict[str, str]
) -> tuple[int, list[int]]:
    """(status, generated token ids) of one chat request with ``return_token_ids``, streamed or
    not as ``body`` says; a stream must carry no error event."""
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        if response.status_code != 200:
            return response.status_code, []
        return 200, response.json()["choices"][0]["token_ids"]
    tokens: list[int] = []
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    tokens += choice.get("token_ids") or []
        return response.status_code, tokens
