"""Faults, on a tiny model served by a real subprocess:

* an engine error in one request (injected by the tests' own :mod:`fault_injection`, which
  wraps the server's engine) is a 500 — or a stream ``error`` event — for that
  request alone; the requests beside it in the same batch get exactly their solo tokens;
* a dead engine (the fault hook's stop, the transformers engine's thread dying, a vLLM worker
  killed mid-request) ends the server with ENGINE_DIED_EXIT_CODE, for a supervisor to restart;
* SIGTERM lets in-flight requests finish, then the process exits 0;
* start-up with a missing, corrupt or mismatched model or artifact exits 2 with one
  ``abliserve: error:`` line and no traceback, before any model loads.

Client disconnects are tested on the demo model in ``test_soak.py``, where a generation lasts
long enough that an abort is certain to land mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tiny_models
from fault_injection import FAULT_SEED, STOP_SEED, STOPPED
from reliability_harness import served
from server_harness import tiny_direction

from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines.base import EngineStoppedError, GenerationRequest, SamplingOptions
from abliserve.server.engines.transformers_engine import TransformersEngine
from abliserve.server.watchdog import ENGINE_DIED_EXIT_CODE

MODEL = "tiny"
PROMPTS = ["how to make a cake", "tell me about the weather", "write a poem"]
TIMEOUT_S = 300  # hang guards only


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reliability")
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=2, hidden=32)
    other = tiny_models.checkpoint(folder / "other", "llama", num_layers=2, hidden=32, seed=7)
    return {
        "folder": folder,
        "checkpoint": checkpoint,
        "direction": tiny_direction(checkpoint, folder / "refusal.safetensors", seed=1),
        "foreign direction": tiny_direction(other, folder / "foreign.safetensors", seed=1),
    }


def serve_args(tiny: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--model",
        str(tiny["checkpoint"]),
        "--engine",
        "transformers",
        "--served-model-name",
        MODEL,
        "--direction",
        f"refusal={tiny['direction']}",
        "--log-level",
        "warning",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(tiny):
    with served(
        *serve_args(tiny),
        log_path=tiny["folder"] / "server.log",
        faults=True,
    ) as process:
        yield process


def chat_body(prompt: str, strength: float, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "ablation": {"strength": strength},
        **extra,
    }


def stream_events(text: str) -> list[dict | str]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_engine_error_fails_only_its_own_request(server) -> None:
    cases = [(prompt, strength) for prompt in PROMPTS for strength in (0.0, 1.0)]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
        solo = [
            client.post("/v1/chat/completions", json=chat_body(p, s)).json()["choices"][0]
            for p, s in cases
        ]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            normal = [client.post("/v1/chat/completions", json=chat_body(p, s)) for p, s in cases]
            faulty = client.post(
                "/v1/chat/completions", json=chat_body(PROMPTS[0], 1.0, seed=FAULT_SEED)
            )
            faulty_stream = client.post(
                "/v1/chat/completions",
                json=chat_body(PROMPTS[1], 0.0, seed=FAULT_SEED, stream=True),
            )
            return await asyncio.gather(faulty, faulty_stream, *normal)

    faulty, faulty_stream, *normal = asyncio.run(together())

    assert faulty.status_code == 500
    assert faulty.json()["error"]["type"] == "server_error"
    assert faulty_stream.status_code == 200  # headers were sent before the fault
    events = stream_events(faulty_stream.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "injected test fault"
    for response, reference in zip(normal, solo, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == reference["token_ids"]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client:
        again = client.post("/v1/chat/completions", json=chat_body(PROMPTS[0], 1.0))
        assert again.json()["choices"][0]["token_ids"] == solo[1]["token_ids"]


def test_a_stopped_engine_ends_the_server_with_the_engine_died_status(tiny) -> None:
    """When the engine can serve no more, the request that found out is a 503 naming the cause
    and the process exits with ENGINE_DIED_EXIT_CODE (not a zombie answering 503 forever), so
    a supervisor restarts it. Before this policy the server stayed up indefinitely."""
    with served(*serve_args(tiny), log_path=tiny["folder"] / "stop.log", faults=True) as process:
        with httpx.Client(base_url=process.url, timeout=TIMEOUT_S) as client:
            assert client.get("/health").status_code == 200
            body = chat_body(PROMPTS[0], 0.0, seed=STOP_SEED)
            stop = client.post("/v1/chat/completions", json=body)
        assert stop.status_code == 503, stop.text
        assert stop.json()["error"] == {
            "message": STOPPED,
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert process.process.wait(timeout=TIMEOUT_S) == ENGINE_DIED_EXIT_CODE
    assert f"exit status {ENGINE_DIED_EXIT_CODE}" in process.log()
    assert "Traceback" not in process.log()


def test_a_dead_transformers_engine_thread_fails_requests_and_reports_stopped(tiny) -> None:
    """The transformers engine's thread dying (here: SystemExit from a decode step, which the
    per-step error handling does not catch) used to leave every request waiting forever. Now
    the request in flight and every later one get EngineStoppedError, and stopped() says why,
    which is what the server's watchdog acts on."""
    identity = checkpoint_identity(tiny["checkpoint"])
    engine = TransformersEngine(tiny["checkpoint"], identity, {})

    def die() -> None:
        raise SystemExit("simulated thread death")

    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        await engine.start()
        engine._decode = die  # the first decode step (after the prefill's token) kills it
        sampling = SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True)
        errors = []
        for request_id in ("in-flight", "later"):
            request = GenerationRequest(request_id, [1, 2, 3], sampling)
            try:
                async for _ in engine.generate(request):
                    pass
            except EngineStoppedError as error:
                errors.append(error)
        await engine.shutdown()
        return errors

    errors = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    assert len(errors) == 2
    assert engine.stopped() is not None and "SystemExit" in engine.stopped()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.real_model
@pytest.mark.vllm
def test_a_killed_vllm_worker_ends_the_server_with_the_engine_died_status(
    demo_direction, tmp_path
) -> None:
    """SIGKILL every process below the server (vLLM's engine core and workers) while a stream
    is generating: the stream ends (no hang), the server exits with ENGINE_DIED_EXIT_CODE."""
    pytest.importorskip("vllm")
    args = [
        *("--model", "demo", "--engine", "vllm", "--enforce-eager", "--dtype", "float32"),
        *("--max-model-len", "1024", "--served-model-name", MODEL, "--log-level", "info"),
        *("--direction", f"refusal={demo_direction}"),
    ]
    with served(*args, log_path=tmp_path / "vllm.log") as process:
        body = chat_body("Write a long story about the sea.", 1.0, max_tokens=400, stream=True)
        killed: list[int] = []
        with httpx.stream(
            "POST", f"{process.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S
        ) as response:
            assert response.status_code == 200
            received = ""
            for text in response.iter_text():
                received += text
                if not killed and received.count('"token_ids"') >= 3:
                    killed = descendants(process.process.pid)
                    for pid in killed:
                        os.kill(pid, signal.SIGKILL)
        assert killed, "no engine process found below the server"
        assert received.rstrip().endswith("data: [DONE]")
        assert '"error"' in received  # the stream says it failed rather than ending as done
        assert process.process.wait(timeout=TIMEOUT_S) == ENGINE_DIED_EXIT_CODE
    assert f"exit status {ENGINE_DIED_EXIT_CODE}" in process.log()


def test_sigterm_lets_in_flight_requests_finish(tiny) -> None:
    """SIGTERM arrives while streams are mid-generation: each still ends with its full token
    count and [DONE], and the process exits 0. (The grace period is made generous so that
    "finish" is certain on a slow machine; past it, uvicorn cancels what is left.)"""
    max_tokens = 16
    args = serve_args(tiny, "--shutdown-timeout", "600")
    with served(*args, log_path=tiny["folder"] / "sigterm.log") as process:

        async def stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event):
            body = chat_body(prompt, 0.5, stream=True, max_tokens=max_tokens)
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    if '"token_ids"' in text:
                        started.set()
                return text

        async def scenario():
            async with httpx.AsyncClient(base_url=process.url, timeout=TIMEOUT_S) as client:
                flags = [asyncio.Event() for _ in PROMPTS]
                tasks = [
                    asyncio.create_task(stream(client, p, f))
                    for p, f in zip(PROMPTS, flags, strict=True)
                ]
                await asyncio.gather(*(f.wait() for f in flags))
                exit_code = await asyncio.to_thread(process.terminate)
                return exit_code, await asyncio.gather(*tasks)

        exit_code, texts = asyncio.run(scenario())
    assert exit_code == 0, process.log()
    for text in texts:
        events = stream_events(text)
        assert events[-1] == "[DONE]"
        tokens = sum(
            len(c["choices"][0].get("token_ids") or []) for c in events[:-1] if c["choices"]
        )
        assert tokens == max_tokens


def start_failure(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "abliserve.cli", "serve", "--port", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


def corrupt_inputs(tiny: dict[str, Path]) -> dict[str, list[str]]:
    folder = tiny["folder"] / "corrupt"
    folder.mkdir(exist_ok=True)
    checkpoint = tiny["checkpoint"]
    truncated = folder / "truncated"
    bad_config = folder / "bad-config"
    for target in (truncated, bad_config):
        target.mkdir(exist_ok=True)
        for file in checkpoint.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
    weights = (checkpoint / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (bad_config / "config.json").write_text("{not json")
    pickled = folder / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"directions": [1.0, 2.0]}))
    base = ["--model", str(checkpoint)]
    return {
        "missing model": ["--model", str(folder / "nope")],
        "truncated weights": ["--model", str(truncated)],
        "corrupt config": ["--model", str(bad_config)],
        "missing artifact": [*base, "--direction", str(folder / "nope.safetensors")],
        "pickle artifact": [*base, "--direction", str(pickled)],
        "artifact for another model": [*base, "--direction", str(tiny["foreign direction"])],
    }


CASES = (
    "missing model",
    "truncated weights",
    "corrupt config",
    "missing artifact",
    "pickle artifact",
    "artifact for another model",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_start_exits_nonzero_with_one_clear_line(tiny, case: str) -> None:
    result = start_failure(*corrupt_inputs(tiny)[case])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abliserve: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
