"""The request battery both vLLM differential tests send, and ``vllm serve`` itself.

The battery uses the fields vLLM's OpenAI server honours (tools through the hermes tool-call
parser the demo model's template speaks, ``response_format``, ``logit_bias``, penalties,
``top_k``/``min_p``, ``stop_token_ids``, ``min_tokens``, logprobs, ``n``, ``seed``, ``echo``,
streaming with usage); :func:`answer` reduces a reply to what must match (no ids, timestamps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from conftest import free_port

MODEL = "demo"
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
TOOL_FLAGS = ["--tool-call-parser", "hermes"]
STARTUP_TIMEOUT_S = 900
SMALL_KV_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
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


def scrub(value: Any, digits: int | None = 4) -> Any:
    """The answer without what differs between any two runs (ids, timestamps), logprobs
    rounded to ``digits`` decimals (kept whole for ``None``)."""
    if isinstance(value, dict):
        return {k: scrub(v, digits) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v, digits) for v in value]
    if isinstance(value, float) and digits is not None:
        return round(value, digits)
    return value


def differences(got: Any, expected: Any, tolerance: float, where: str = "") -> list[str]:
    """Where two answers differ: structure, text and integers exactly, numbers within
    ``tolerance``. Two float32 computations of one model agree to a tolerance, not to a number
    of rounded decimals: rounding splits values that straddle a rounding boundary."""
    if isinstance(got, float) or isinstance(expected, float):
        numbers = all(isinstance(v, int | float) for v in (got, expected))
        close = numbers and abs(got - expected) <= tolerance
        return [] if close else [f"{where}: {got!r} != {expected!r}"]
    if isinstance(got, dict) and isinstance(expected, dict):
        if got.keys() != expected.keys():
            return [f"{where}: keys {sorted(got)} != {sorted(expected)}"]
        return [d for k in got for d in differences(got[k], expected[k], tolerance, f"{where}.{k}")]
    if isinstance(got, list | tuple) and isinstance(expected, list | tuple):
        if len(got) != len(expected):
            return [f"{where}: length {len(got)} != {len(expected)}"]
        pairs = zip(got, expected, strict=True)
        return [
            d
            for i, (g, e) in enumerate(pairs)
            for d in differences(g, e, tolerance, f"{where}[{i}]")
        ]
    return [] if got == expected else [f"{where}: {got!r} != {expected!r}"]


def answer(client: httpx.Client, path: str, body: dict, digits: int | None = 4) -> Any:
    """One request's comparable answer: the status and JSON, or for a stream the text and
    tool-call pieces per choice, the finish reasons and the usage."""
    if not body.get("stream"):
        response = client.post(path, json=body)
        return response.status_code, scrub(response.json(), digits)
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
                seen["tools"] += scrub(delta.get("tool_calls") or [], digits)
                if choice.get("finish_reason"):
                    seen["finish"].append(choice["finish_reason"])
    return 200, {"choices": pieces, "usage": usage}


@contextmanager
def vllm_serve(checkpoint: Path, log_path: Path) -> Iterator[str]:
    """vLLM's own OpenAI server on ``checkpoint`` (``vllm serve``'s module form: the ``vllm``
    script of vllm-cpu does not start), with the flags abliserve's servers get."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
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
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SMALL_KV_ENV}
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


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
