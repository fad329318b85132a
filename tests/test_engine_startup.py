"""Engine start-up on the machine it finds (docs/ENGINES.md, "Sizing vLLM on CPU").

The sizing reads the NUMA node's memory through one function, ``read_node_memory``; tests
replace it to describe a machine (a 10 GiB node with 3 GiB available, a node with almost
nothing left) and show what the server then does: the vLLM engine comes up with a context that
fits, ``--engine auto`` falls back to the transformers engine with one line, and ``--engine
vllm`` fails with one ``abliserve: error:`` line in seconds, exit code 2.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tiny_models
from conftest import free_port

from abliserve.directions.artifact import load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines import EngineOptions
from abliserve.server.engines import vllm_cpu_sizing as sizing
from abliserve.server.engines.base import AblationSpec, GenerationRequest, SamplingOptions
from abliserve.server.engines.startup import EngineStartError, StartupOutput, start_engine

GIB = sizing.GIB
CONSTRAINED = sizing.NodeMemory(node=0, total=10 * GIB, available=3 * GIB)
ALMOST_FULL = sizing.NodeMemory(node=0, total=10 * GIB, available=GIB // 8)
REPO = Path(__file__).resolve().parents[1]


def demo_footprint(demo_checkpoint: Path) -> sizing.ModelFootprint:
    return sizing.model_footprint(demo_checkpoint, "float32")


def test_demo_footprint_is_read_from_config_and_headers(demo_checkpoint: Path) -> None:
    footprint = demo_footprint(demo_checkpoint)
    # Qwen2.5-0.5B: 24 layers x 2 KV heads x 64 dims x (K and V) x 4 bytes.
    assert footprint.kv_bytes_per_token == 24 * 2 * 64 * 2 * 4
    assert footprint.max_context == 32768
    # 494M parameters plus an untied 136M-parameter lm_head, 4 bytes each.
    assert 2.2 * GIB < footprint.weight_bytes < 2.5 * GIB


def test_a_constrained_node_gets_a_fitted_context(demo_checkpoint: Path) -> None:
    footprint = demo_footprint(demo_checkpoint)
    plan = sizing.plan_cpu_memory(CONSTRAINED, footprint)
    assert sizing.MIN_CONTEXT_TOKENS <= plan.max_model_len < footprint.max_context
    assert plan.max_model_len % sizing.BLOCK_TOKENS == 0
    assert plan.max_model_len * footprint.kv_bytes_per_token <= plan.kv_cache_bytes
    used = footprint.weight_bytes + sizing.RUNTIME_OVERHEAD_BYTES + plan.kv_cache_bytes
    assert used < CONSTRAINED.available
    assert "--kv-cache-memory-bytes" in plan.log_line() and "--max-model-len" in plan.log_line()


def test_a_roomy_node_keeps_the_full_context(demo_checkpoint: Path) -> None:
    footprint = demo_footprint(demo_checkpoint)
    roomy = sizing.NodeMemory(node=0, total=24 * GIB, available=20 * GIB)
    plan = sizing.plan_cpu_memory(roomy, footprint)
    assert plan.max_model_len == footprint.max_context
    assert plan.kv_cache_bytes == sizing.KV_FULL_CONTEXTS * footprint.max_context * (
        footprint.kv_bytes_per_token
    )


def test_what_cannot_fit_is_one_line_naming_the_fix(demo_checkpoint: Path) -> None:
    footprint = demo_footprint(demo_checkpoint)
    with pytest.raises(sizing.InsufficientMemoryError) as error:
        sizing.plan_cpu_memory(ALMOST_FULL, footprint)
    assert "\n" not in str(error.value) and "--engine transformers" in str(error.value)
    with pytest.raises(sizing.InsufficientMemoryError, match="--max-model-len"):
        sizing.plan_cpu_memory(CONSTRAINED, footprint, max_model_len=32768)
    with pytest.raises(sizing.InsufficientMemoryError, match="--kv-cache-memory-bytes"):
        sizing.check_explicit_kv(CONSTRAINED, footprint, 2 * GIB)


def test_explicit_memory_flags_win(demo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizing, "read_node_memory", lambda: CONSTRAINED)
    monkeypatch.delenv(sizing.KV_ENV, raising=False)
    base = {"model": str(demo_checkpoint), "dtype": "float32"}
    chosen = sizing.size_vllm_args(base, demo_checkpoint)
    assert chosen["enforce_eager"] is True and chosen["kv_cache_memory_bytes"] > 0
    utilisation = sizing.size_vllm_args(
        {**base, "gpu_memory_utilization": 0.3, "enforce_eager": False}, demo_checkpoint
    )
    assert "kv_cache_memory_bytes" not in utilisation and utilisation["enforce_eager"] is False
    monkeypatch.setenv(sizing.KV_ENV, "1")
    assert "kv_cache_memory_bytes" not in sizing.size_vllm_args(base, demo_checkpoint)


def test_startup_output_keeps_child_tracebacks_and_finds_the_root_cause(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A child process started while the output is held back inherits the pipes: its traceback
    stays out of the terminal, our own log lines pass, and the root cause is its exception."""
    child = (
        "import sys; print('INFO 12-02 [core.py:1] loading'); "
        "print('INFO abliserve.x: ours', file=sys.stderr); "
        "raise ValueError('Available memory on node 0 is less than requested')"
    )

    async def run() -> str | None:
        with StartupOutput(verbose=False) as output:
            subprocess.run([sys.executable, "-c", child], check=False)
            await output.settled()
        return output.root_cause()

    cause = asyncio.run(run())
    assert cause == "ValueError: Available memory on node 0 is less than requested"
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "loading" not in printed.out
    assert "INFO abliserve.x: ours" in printed.err


vllm_only = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("vllm") is None, reason="vLLM not installed"
)


@vllm_only
def test_auto_falls_back_to_transformers_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = tiny_models.checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(sizing, "read_node_memory", lambda: sizing.NodeMemory(0, GIB, 0))
    monkeypatch.delenv(sizing.KV_ENV, raising=False)
    identity = checkpoint_identity(checkpoint)

    async def run() -> str:
        engine = await start_engine("auto", checkpoint, identity, {}, EngineOptions())
        try:
            return engine.name
        finally:
            await engine.shutdown()

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(run()) == "transformers"
    [line] = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert "not enough memory" in line and "--engine vllm makes this an error" in line

    async def explicit() -> None:
        await start_engine("vllm", checkpoint, identity, {}, EngineOptions())

    with pytest.raises(EngineStartError, match="not enough memory"):
        asyncio.run(explicit())


@vllm_only
def test_explicit_vllm_that_cannot_start_is_one_line_and_fast(tmp_path: Path) -> None:
    checkpoint = tiny_models.checkpoint(tmp_path / "tiny")
    started = time.monotonic()
    command = [sys.executable, "-m", "abliserve.cli", "serve", "--model", str(checkpoint)]
    command += ["--engine", "vllm", "--port", str(free_port()), "--kv-cache-memory-bytes", "64T"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    elapsed = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("abliserve:")]
    assert result.returncode == 2, result.stderr
    assert errors == [errors[-1]] and "--kv-cache-memory-bytes 65536.0 GiB" in errors[0]
    assert "Traceback" not in result.stderr
    # The cause is known before any vLLM process starts: no model load, no compile.
    assert "Loading weights" not in result.stdout + result.stderr, elapsed


def test_a_taken_port_is_one_line_before_the_engine_starts(tmp_path: Path) -> None:
    """The socket is bound before the engine starts: a taken port is refused at once (and no
    process the engine starts can take the port while the model loads)."""
    checkpoint = tiny_models.checkpoint(tmp_path / "tiny")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "abliserve.cli", "serve", "--model", str(checkpoint)]
        command += ["--engine", "transformers", "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    errors = [line for line in result.stderr.splitlines() if line.startswith("abliserve:")]
    assert result.returncode == 2, result.stderr
    assert errors == [
        f"abliserve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "Traceback" not in result.stderr
    assert "abliserve ready" not in result.stdout + result.stderr  # the engine never started


@pytest.mark.vllm
@pytest.mark.real_model
@vllm_only
def test_vllm_comes_up_on_a_10_gib_node_with_3_gib_available(
    demo_checkpoint: Path, demo_direction: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure a new user saw: vLLM's default fraction of a 10 GiB node does not fit in
    3 GiB. Sized from what is available, the engine starts, with a context that fits, and
    serves both a baseline and an ablated request."""
    monkeypatch.setattr(sizing, "read_node_memory", lambda: CONSTRAINED)
    monkeypatch.delenv(sizing.KV_ENV, raising=False)
    expected = sizing.plan_cpu_memory(CONSTRAINED, demo_footprint(demo_checkpoint))
    identity = checkpoint_identity(demo_checkpoint)
    directions = {"refusal": load_artifact(demo_direction)}
    options = EngineOptions(dtype="float32")

    async def run() -> tuple[str, int, list[list[int]]]:
        engine = await start_engine("vllm", demo_checkpoint, identity, directions, options)
        try:
            outputs = []
            for index, strength in enumerate((0.0, 1.0)):
                request = GenerationRequest(
                    request_id=f"constrained-{index}",
                    prompt_token_ids=[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198],
                    sampling=SamplingOptions(max_tokens=4, temperature=0.0),
                    ablation=AblationSpec("refusal", strength),
                )
                tokens: list[int] = []
                async for chunk in engine.generate(request):
                    tokens += chunk.token_ids
                outputs.append(tokens)
            return engine.name, engine.max_model_len, outputs
        finally:
            await engine.shutdown()

    name, max_model_len, outputs = asyncio.run(run())
    assert name == "vllm"
    assert max_model_len == expected.max_model_len < 32768
    assert all(len(tokens) == 4 for tokens in outputs)


@vllm_only
def test_serve_auto_falls_back_end_to_end(tmp_path: Path) -> None:
    """`abliserve serve --engine auto` where vLLM cannot start (its KV cache cannot fit) serves
    with the transformers engine and says why in one warning line."""
    from reliability_harness import served

    checkpoint = tiny_models.checkpoint(tmp_path / "tiny")
    args = ["--model", str(checkpoint), "--engine", "auto", "--kv-cache-memory-bytes", "64T"]
    with served(*args, log_path=tmp_path / "serve.log") as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert models["data"][0]["id"]
    lines = [line for line in server.log().splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "serving with the transformers engine instead" in lines[0]
    assert "Traceback" not in server.log()
