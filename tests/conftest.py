"""Shared fixtures. Real-model fixtures are session-scoped: the demo model is provisioned (and
converted) once per machine and loaded once per test session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIRECTION = REPO / "abliserve/data/directions/qwen2.5-coder-0.5b-instruct.safetensors"


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from abliserve.demo_model import provision_demo_model

    return provision_demo_model()


@pytest.fixture(scope="session")
def demo_direction() -> Path:
    assert DEMO_DIRECTION.is_file(), f"committed demo direction missing: {DEMO_DIRECTION}"
    return DEMO_DIRECTION


def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
