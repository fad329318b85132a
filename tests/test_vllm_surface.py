"""abliserve's vLLM engine answers chat and completions exactly as ``vllm serve`` does.

A battery of requests using the fields vLLM's OpenAI server honours (tools through the hermes
tool-call parser the demo model's template speaks, ``response_format``, ``logit_bias``,
penalties, ``top_k``/``min_p``, ``stop_token_ids``, ``min_tokens``, logprobs, ``n``, ``seed``,
``echo``, streaming with usage) goes to vLLM's own OpenAI server and to ``abliserve serve
--engine vllm`` at strength 0, both on the demo model; the answers must be identical (request
ids and timestamps aside). abliserve serves these routes through vLLM's own OpenAI serving
(README, "Serve"); this is the proof that nothing is accepted and dropped on the way.

Two servers start once for the module (eager, float32, 1 GiB of KV cache each).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from reliability_harness import served
from vllm_battery import (
    BATTERY,
    ENGINE_FLAGS,
    MODEL,
    SMALL_KV_ENV,
    TOOL_FLAGS,
    answer,
    text,
    vllm_serve,
)

from abliserve.server.protocol import MAX_STOP_CHARS

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Iterator[str]:
    from abliserve.models import resolve_model

    log_path = tmp_path_factory.mktemp("reference") / "vllm.log"
    with vllm_serve(resolve_model("demo"), log_path) as url:
        yield url


@pytest.fixture(scope="module")
def abliserve(reference: str, tmp_path_factory) -> Iterator[str]:
    """``abliserve serve --demo --engine vllm`` (strength 0 by default), started once the
    reference is up, so the two never load at the same time."""
    log_path = tmp_path_factory.mktemp("abliserve") / "server.log"
    flags = ["--demo", "--engine", "vllm", "--served-model-name", MODEL, *ENGINE_FLAGS]
    with served(*flags, *TOOL_FLAGS, log_path=log_path, env=SMALL_KV_ENV) as server:
        yield server.url


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
    metrics = client.get("/metrics").text  # abliserve's per-ablation counters see vLLM's answers
    assert 'abliserve_requests_total{ablation="on",endpoint="chat",finish_reason="length"}' in (
        metrics
    )


def openai_fields_vllm_lacks() -> list[tuple[str, str]]:
    """(endpoint path, field) for each field of OpenAI's own request types (the ``openai``
    SDK's) that vLLM's request models do not name."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    pairs = []
    for path, sdk, vllm_model in (
        ("/v1/chat/completions", chat_create_params, ChatCompletionRequest),
        ("/v1/completions", completion_create_params, CompletionRequest),
    ):
        for name in sorted(sdk.CompletionCreateParamsBase.__annotations__):
            if name not in vllm_model.model_fields:
                pairs.append((path, name))
    return pairs


def test_fields_vllm_does_not_know_are_refused_by_name(clients) -> None:
    """``vllm serve`` logs and drops a field its models do not name; abliserve refuses it."""
    _, client = clients
    bodies = {"/v1/chat/completions": BATTERY["logprobs"][1], "/v1/completions": text()[1]}
    bodies["/v1/completions"]["prompt"] = "hi"
    for path, name in openai_fields_vllm_lacks():
        response = client.post(path, json={**bodies[path], name: None})
        assert response.status_code == 400, (path, name, response.text)
        assert response.json()["error"]["param"] == name


def test_stop_lists_are_bounded_on_the_vllm_path_too(clients) -> None:
    """A long stop list costs a search per stop string per token: vLLM bounds their count
    (VLLM_MAX_STOP_STRINGS), abliserve also their total length, as on the transformers engine."""
    _, client = clients
    chat = BATTERY["logprobs"][1]
    many = client.post(
        "/v1/chat/completions", json={**chat, "stop": [f"s{i}" for i in range(1025)]}
    )
    assert many.status_code == 400, many.text
    assert many.json()["error"]["param"].startswith("stop")
    long_stops = ["x" * (MAX_STOP_CHARS // 2 + 1)] * 2
    long = client.post("/v1/chat/completions", json={**chat, "stop": long_stops})
    assert long.status_code == 400, long.text
    assert long.json()["error"]["param"] == "stop"
    within = client.post("/v1/chat/completions", json={**chat, "stop": ["s0", "s1"]})
    assert within.status_code == 200, within.text


def test_ab_and_first_token_run_on_the_vllm_engine(clients) -> None:
    """abliserve's own routes share one request path on either engine: on vLLM, A/B's baseline
    variant is the greedy chat answer, and first-token's baseline KL is 0 while strength 1's
    is positive (the whole distribution comes from the engine as one tensor)."""
    _, client = clients
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    chat = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
    ).json()
    ab = client.post(
        "/v1/ab", json={"model": MODEL, "messages": messages, "max_tokens": 8, "strengths": [1]}
    )
    assert ab.status_code == 200, ab.text
    baseline, ablated = ab.json()["variants"]
    assert baseline["text"] == chat["choices"][0]["message"]["content"]
    assert ablated["ablation"] == {"direction": "refusal", "strength": 1.0}
    first = client.post("/v1/ab/first-token", json={"messages": messages, "strengths": [0, 1]})
    assert first.status_code == 200, first.text
    kls = [variant["kl_from_baseline"] for variant in first.json()["variants"]]
    assert kls[0] == kls[1] == 0.0 and kls[2] > 0
