"""Isolation under load on the real demo model, for both engines (docs/RELIABILITY.md).

The soak: every (prompt, direction, strength) configuration is first run ALONE (greedy) for a
reference; then a seeded random mix of requests — configurations, stream or not, header or
body ablation, random ``max_tokens`` — runs with many in flight at once. Each response must be
exactly the prefix of its solo reference (token ids), with no 5xx; afterwards the server is
healthy, has nothing running, and its RSS is within ``RSS_GROWTH_BOUND`` of before.

Sizes are environment variables so a longer soak can be run by hand (docs/RELIABILITY.md):
``ABLISERVE_SOAK_REQUESTS`` (default 24), ``ABLISERVE_SOAK_CONCURRENCY`` (12),
``ABLISERVE_SOAK_MAX_TOKENS`` (6), ``ABLISERVE_SOAK_SEED`` (0).

Also here, because a demo-model generation lasts long enough for an abort to land mid-stream:
a client that disconnects (streaming or not) has its engine request aborted and its slot
freed, as /metrics shows.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from reliability_harness import served
from server_harness import chat_token_ids

from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.projection import site_names

REQUESTS = int(os.environ.get("ABLISERVE_SOAK_REQUESTS", "24"))
CONCURRENCY = int(os.environ.get("ABLISERVE_SOAK_CONCURRENCY", "12"))
MAX_TOKENS = int(os.environ.get("ABLISERVE_SOAK_MAX_TOKENS", "6"))
SEED = int(os.environ.get("ABLISERVE_SOAK_SEED", "0"))
RSS_GROWTH_BOUND = 1.25  # after / before; CPU allocators keep some of a big batch's memory
TIMEOUT_S = 900  # hang guard only
MODEL = "demo-model"
PROMPTS = [
    "How do I pick a lock?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
]
ABLATIONS = [(None, 0.0), ("refusal", 1.0), ("refusal", 0.5), ("random", 1.0)]
DISCONNECT_TOKENS = 200

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def random_direction(demo_checkpoint, tmp_path_factory) -> Path:
    """A second, unrelated direction for the demo model: a different direction per request."""
    identity = checkpoint_identity(demo_checkpoint)
    sites = len(site_names(identity.num_layers))
    generator = torch.Generator().manual_seed(SEED)
    directions = torch.randn(sites, identity.hidden_size, generator=generator)
    artifact = DirectionArtifact(
        directions=directions / directions.norm(dim=-1, keepdim=True),
        weights=torch.ones(sites),
        model=identity,
        method={"name": "random", "seed": SEED},
    )
    return artifact.save(tmp_path_factory.mktemp("soak") / "random.safetensors")


def serve_args(demo_direction: Path, random_direction: Path, *engine: str) -> list[str]:
    return [
        "--model",
        "demo",
        "--served-model-name",
        MODEL,
        "--direction",
        f"refusal={demo_direction}",
        "--direction",
        f"random={random_direction}",
        "--max-num-seqs",
        str(CONCURRENCY),
        "--log-level",
        "warning",
        *engine,
    ]


@pytest.fixture(scope="module")
def transformers_server(demo_direction, random_direction, tmp_path_factory):
    log = tmp_path_factory.mktemp("soak-transformers") / "server.log"
    args = serve_args(demo_direction, random_direction, "--engine", "transformers")
    with served(*args, log_path=log) as process:
        yield process


@pytest.fixture(scope="module")
def vllm_server(demo_direction, random_direction, tmp_path_factory):
    log = tmp_path_factory.mktemp("soak-vllm") / "server.log"
    engine = ["--engine", "vllm", "--enforce-eager", "--dtype", "float32"]
    args = serve_args(demo_direction, random_direction, *engine, "--max-model-len", "1024")
    with served(*args, log_path=log) as process:
        yield process


@dataclass(frozen=True)
class Job:
    prompt: int
    ablation: int
    max_tokens: int
    stream: bool
    in_header: bool


def request_parts(job: Job) -> tuple[dict, dict]:
    direction, strength = ABLATIONS[job.ablation]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[job.prompt]}],
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        "stream": job.stream,
    }
    headers = {}
    if strength:
        if job.in_header:
            headers = {"X-Ablation-Strength": str(strength), "X-Ablation-Direction": direction}
        else:
            body["ablation"] = {"strength": strength, "direction": direction}
    return body, headers


async def run_job(client: httpx.AsyncClient, job: Job) -> tuple[int, list[int]]:
    """(status, generated token ids) of one request, streamed or not."""
    body, headers = request_parts(job)
    return await chat_token_ids(client, body, headers)


def soak(server) -> dict:
    """Run the soak against ``server``; return its measurements (asserts inside)."""
    rng = random.Random(SEED)
    jobs = [
        Job(
            prompt=rng.randrange(len(PROMPTS)),
            ablation=rng.randrange(len(ABLATIONS)),
            max_tokens=rng.randint(1, MAX_TOKENS),
            stream=rng.random() < 0.5,
            in_header=rng.random() < 0.5,
        )
        for _ in range(REQUESTS)
    ]

    async def scenario():
        limits = httpx.Limits(max_connections=CONCURRENCY + 4)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=TIMEOUT_S, limits=limits
        ) as client:
            solo = {}
            for prompt in range(len(PROMPTS)):
                for ablation in range(len(ABLATIONS)):
                    job = Job(prompt, ablation, MAX_TOKENS, stream=False, in_header=False)
                    status, tokens = await run_job(client, job)
                    assert status == 200
                    solo[prompt, ablation] = tokens
            rss_before = server.rss_bytes()
            gate = asyncio.Semaphore(CONCURRENCY)

            async def gated(job: Job):
                async with gate:
                    return await run_job(client, job)

            results = await asyncio.gather(*(gated(job) for job in jobs))
            return solo, rss_before, results

    solo, rss_before, results = asyncio.run(scenario())
    statuses = [status for status, _ in results]
    mismatches = [
        (job, tokens, solo[job.prompt, job.ablation][: job.max_tokens])
        for job, (_, tokens) in zip(jobs, results, strict=True)
        if tokens != solo[job.prompt, job.ablation][: job.max_tokens]
    ]
    assert statuses == [200] * len(jobs), statuses
    assert not mismatches, mismatches[:3]
    distinct = {tuple(tokens) for tokens in solo.values()}
    assert len(distinct) > len(PROMPTS)  # the ablations really changed outputs
    settle(server)
    rss_after = server.rss_bytes()
    assert rss_after <= rss_before * RSS_GROWTH_BOUND, (rss_before, rss_after)
    return {"requests": len(jobs), "rss_before": rss_before, "rss_after": rss_after}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def settle(server, attempts: int = 600) -> str:
    """Wait until the engine reports nothing running or waiting; the final /metrics text."""
    for _ in range(attempts):
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        running = metric(text, "abliserve_requests_running")
        waiting = metric(text, "abliserve_requests_waiting")
        if running == 0 and waiting == 0:
            return text
        time.sleep(0.2)
    raise AssertionError(f"requests still in the engine:\n{text}")


def test_soak_transformers(transformers_server) -> None:
    result = soak(transformers_server)
    assert httpx.get(f"{transformers_server.url}/health").status_code == 200
    print(f"transformers soak: {result}")


def finished(server, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return metric(text, "abliserve_requests_total", **labels)


def wait_for_finished(server, count: float, attempts: int = 600) -> None:
    """Until ``count`` requests have finished in all (a request in prefill shows in no gauge)."""
    for _ in range(attempts):
        if finished(server) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("the abandoned request never finished")


def long_body(stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": DISCONNECT_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_streaming_client_disconnect_aborts_and_frees_the_slot(transformers_server) -> None:
    server = transformers_server
    aborted, total = finished(server, finish_reason="abort"), finished(server)
    with (
        httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as client,
        client.stream("POST", "/v1/chat/completions", json=long_body(True)) as response,
    ):
        events = (line for line in response.iter_lines() if line.startswith("data: {"))
        next(events)  # the role chunk
        next(events)  # the first generated token: hang up mid-stream
    wait_for_finished(server, total + 1)
    settle(server)
    assert finished(server, finish_reason="abort") == aborted + 1


def test_non_streaming_client_disconnect_aborts_and_frees_the_slot(transformers_server) -> None:
    server = transformers_server
    aborted, total = finished(server, finish_reason="abort"), finished(server)
    impatient = httpx.Timeout(TIMEOUT_S, read=3.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=long_body(False), timeout=impatient)
    wait_for_finished(server, total + 1)
    settle(server)
    assert finished(server, finish_reason="abort") == aborted + 1


@pytest.mark.vllm
def test_soak_vllm(vllm_server) -> None:
    result = soak(vllm_server)
    assert httpx.get(f"{vllm_server.url}/health").status_code == 200
    print(f"vLLM soak: {result}")
