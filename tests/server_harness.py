"""Start ``abliserve serve`` as a real subprocess on a free localhost port, for server tests.

A subprocess (not an in-process app) is what users run: it proves the CLI, the lifespan and
uvicorn together, and a crash in it cannot take the test process down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from conftest import free_port

STARTUP_TIMEOUT_S = 600  # generous: the test machine is shared and often saturated


@contextmanager
def running_server(*args: str, log_path: Path) -> Iterator[str]:
    """Run ``abliserve serve ARGS`` and yield its base URL once /health answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "abliserve.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({process.returncode}):\n{log_path.read_text()}"
                    )
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def tiny_direction(checkpoint: Path, path: Path, seed: int) -> Path:
    """A random unit direction per site for the tiny checkpoint, saved as an artifact."""
    from tiny_models import random_directions

    from abliserve.directions.artifact import DirectionArtifact
    from abliserve.models import checkpoint_identity

    identity = checkpoint_identity(checkpoint)
    sites = 2 * identity.num_layers + 1
    artifact = DirectionArtifact(
        directions=random_directions(sites, identity.hidden_size, seed=seed),
        weights=torch.ones(sites),
        model=identity,
        method={"name": "random", "seed": seed},
    )
    return artifact.save(path)
