"""abliserve's vLLM engine answers chat and completions exactly as ``vllm serve`` does.

A battery of requests using the fields vLLM's OpenAI server honours (tools through the hermes
tool-call parser the demo model's template speaks, ``response_format``, ``logit_bias``,
penalties, ``top_k``/``min_p``, ``stop_token_ids``, ``min_tokens``, logprobs, ``n``, ``seed``,
``echo``, streaming with usage) goes to vLLM's own OpenAI server and to ``abliserve serve
--engine vllm`` at strength 0, both on the demo model; the answers must be identical (request
ids and timestamps aside). See docs/ on the vLLM engine: abliserve serves these routes through
vLLM's own OpenAI serving, so this is the proof nothing is accepted and dropped.

Two servers start once for the module (eager, float32, 1 GiB of KV cache each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from reliability_harness import served

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

MODEL = "demo"
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
TOOL_FLAGS = ["--tool-call-parser", "hermes"]
STARTUP_TIMEOUT_S = 900
VOLATILE = {"id", "created", "system_fingerprint", "ablation", "service_tier"}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "Write one short sentence about the sea."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def chat(**fields: Any) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": MODEL, "max_tokens": 12, **fields}


def text(**fields: Any) -> tuple[str, dict]:
    return "/v1/completions", {"model": MODEL, "max_tokens": 8, **fields}


BATTERY: dict[str, tuple[str, dict]] = {
    "tools_auto": chat(messages=WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=40),
    "tools_named": chat(
        messages=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=24,
    ),
    "json_object": chat(
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=24,
    ),
    "json_schema": chat(
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
        temperature=0,
        max_tokens=24,
    ),
    "logit_bias": chat(messages=ASK, logit_bias={"13": 100}, temperature=0, max_tokens=4),
    "penalties": chat(
        messages=ASK,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        repetition_penalty=1.3,
    ),
    "top_k_min_p": chat(messages=ASK, temperature=0.9, top_k=5, min_p=0.1, seed=7),
    "stop_token_ids": chat(messages=ASK, temperature=0, stop_token_ids=[279, 264]),
    "min_tokens": chat(
        messages=[{"role": "user", "content": "Say just: yes"}],
        temperature=0,
        min_tokens=6,
        max_tokens=8,
    ),
    "logprobs": chat(messages=ASK, temperature=0, logprobs=True, top_logprobs=3, max_tokens=4),
    "n_seed": chat(messages=ASK, temperature=1.0, n=2, seed=3, max_tokens=6),
    "stream_usage": chat(
        messages=ASK, temperature=0, stream=True, stream_options={"include_usage": True}
    ),
    "stream_tools": chat(
        messages=WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=40, stream=True
    ),
    "completion_echo": text(prompt="def fib(n):", temperature=0, echo=True, logprobs=2),
    "completion_stream": text(
        prompt="The capital of France is",
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ),
}


def scrub(value: Any) -> Any:
    """The answer without what differs between any two runs (ids, timestamps), logprobs
    rounded to 4 decimals."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def answer(client: httpx.Client, path: str, body: dict) -> Any:
    """One request's comparable answer: the status and JSON, or for a stream the text and
    tool-call pieces per choice, the finish reasons and the usage."""
    if not body.get("stream"):
        response = client.post(path, json=body)
        return response.status_code, scrub(response.json())
    pieces: dict[int, dict[str, Any]] = {}
    usage = None
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                seen = pieces.setdefault(choice["index"], {"text": "", "tools": [], "finish": []})
                delta = choice.get("delta") or {}
                seen["text"] += delta.get("content") or choice.get("text") or ""
                seen["tools"] += scrub(delta.get("tool_calls") or [])
                if choice.get("finish_reason"):
                    seen["finish"].append(choice["finish_reason"])
    return 200, {"choices": pieces, "usage": usage}


@pytest.fixture(scope="module")
def demo_checkpoint() -> Path:
    from abliserve.models import resolve_model

    return resolve_model("demo")


@pytest.fixture(scope="module")
def small_kv_env() -> dict[str, str]:
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def reference(demo_checkpoint: Path, small_kv_env: dict, tmp_path_factory) -> Iterator[str]:
    """vLLM's own OpenAI server on the demo checkpoint (``vllm serve``'s module form)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("reference") / "vllm.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(demo_checkpoint),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-auto-tool-choice",
        *TOOL_FLAGS,
        *ENGINE_FLAGS,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **small_kv_env}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not start:\n{log_path.read_text()}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def abliserve(reference: str, small_kv_env: dict, tmp_path_factory) -> Iterator[str]:
    """``abliserve serve --demo --engine vllm`` (strength 0 by default), started once the
    reference is up, so the two never load at the same time."""
    log_path = tmp_path_factory.mktemp("abliserve") / "server.log"
    flags = ["--demo", "--engine", "vllm", "--served-model-name", MODEL, *ENGINE_FLAGS]
    with served(*flags, *TOOL_FLAGS, log_path=log_path, env=small_kv_env) as server:
        yield server.url


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def clients(reference: str, abliserve: str) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with (
        httpx.Client(base_url=reference, timeout=300) as vllm_client,
        httpx.Client(base_url=abliserve, timeout=300) as abliserve_client,
    ):
        yield vllm_client, abliserve_client


@pytest.mark.parametrize("case", list(BATTERY))
def test_same_answer_as_vllm_serve(case: str, clients) -> None:
    reference_client, abliserve_client = clients
    path, body = BATTERY[case]
    expected = answer(reference_client, path, body)
    got = answer(abliserve_client, path, body)
    assert expected[0] == 200, expected
    assert got == expected


def test_the_battery_exercises_what_it_names(clients) -> None:
    """The differential test proves something only if the fields bite: logit_bias forces its
    token, tools come back as tool calls, json_schema output parses to the schema."""
    _, client = clients
    forced = client.post("/v1/chat/completions", json={**BATTERY["logit_bias"][1]}).json()
    assert forced["choices"][0]["message"]["content"] == "." * 4  # token 13 is "."
    called = client.post("/v1/chat/completions", json=BATTERY["tools_named"][1]).json()
    call = called["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    assert "city" in json.loads(call["arguments"])
    person = client.post("/v1/chat/completions", json=BATTERY["json_schema"][1]).json()
    content = person["choices"][0]["message"]["content"]
    assert content.startswith("{")


def test_ablation_is_reported_and_authorised(clients) -> None:
    """abliserve's additions around vLLM's serving: the applied ablation in the body, the
    header and the first and last stream chunks; an unknown direction is a 400 before vLLM."""
    _, client = clients
    path, body = BATTERY["logprobs"]
    response = client.post(path, json=body, headers={"X-Ablation-Strength": "1"})
    assert response.status_code == 200
    assert response.json()["ablation"] == {"direction": "refusal", "strength": 1.0}
    assert response.headers["X-Ablation-Applied"] == "direction=refusal;strength=1.0"
    stream_path, stream_body = BATTERY["stream_usage"]
    with client.stream("POST", stream_path, json=stream_body) as stream:
        chunks = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: {")]
    assert chunks[0]["ablation"]["strength"] == chunks[-1]["ablation"]["strength"] == 0.0
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert all("ablation" not in c for c in chunks[1:-1])
    wrong = client.post(path, json={**body, "ablation": {"direction": "nope", "strength": 1}})
    assert wrong.status_code == 400
    smuggled = client.post(path, json={**body, "vllm_xargs": {"abliserve": [1, 1.0]}})
    assert smuggled.json()["ablation"]["strength"] == 0.0
