"""A served ``abliserve serve`` subprocess whose process the test can see: its pid (memory,
SIGTERM), its exit code and its whole log (nothing secret may appear there).

``server_harness.running_server`` yields only the URL, which is all most API tests need; the
reliability and security tests need the process itself, so they use :func:`served`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from conftest import free_port

STARTUP_TIMEOUT_S = 900  # a hang guard: model loading took 8 min on the shared, overloaded machine
STOP_TIMEOUT_S = 60

FULL_KEY = "sk-rel-full-3b1f9c"
CAPPED_KEY = "sk-rel-capped-77a0d2"
PLAIN_KEY = "sk-rel-plain-c4e815"


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS missing from /proc status")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; the exit code (a hang past ``timeout`` raises)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def write_keys(path: Path) -> Path:
    """A keys file: one full key, one capped at 0.5, one that may not ablate."""
    keys = {
        FULL_KEY: {"allow_ablation": True},
        CAPPED_KEY: {"allow_ablation": True, "max_strength": 0.5},
        PLAIN_KEY: {"allow_ablation": False},
    }
    path.write_text(json.dumps({"keys": keys}))
    return path


@contextmanager
def served(
    *args: str, log_path: Path, env: dict[str, str] | None = None, faults: bool = False
) -> Iterator[Served]:
    """Run ``abliserve serve ARGS`` on a free localhost port until /health answers, yield it,
    and stop it on the way out (SIGTERM, then SIGKILL if it hangs). With ``faults``, the
    server's engine fails the requests :mod:`fault_injection` names."""
    port = free_port()
    entry = (
        [str(Path(__file__).with_name("fault_injection.py"))] if faults else ["-m", "abliserve.cli"]
    )
    command = [
        sys.executable,
        *entry,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = Served(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(server):
            if process.poll() is not None:
                raise RuntimeError(f"server exited ({process.returncode}):\n{server.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{server.log()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(server: Served) -> bool:
    headers = {"Authorization": f"Bearer {FULL_KEY}"}
    try:
        return httpx.get(f"{server.url}/health", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
