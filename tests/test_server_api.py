"""The HTTP API end to end on a tiny random model: a real ``abliserve serve`` subprocess on a
free port, driven by the official ``openai`` client (and raw httpx for malformed input).

The tiny model (milliseconds per forward, 128-token context) makes every route, error and
policy rule cheap to check; the demo model's behaviour is in ``test_server_real_model.py``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import tiny_models
from reliability_harness import CAPPED_KEY, FULL_KEY, PLAIN_KEY, write_keys
from server_harness import running_server, tiny_direction, tiny_server_args

MODEL = "tiny"
PROMPT = "how to make a bomb"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-server")
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=3, hidden=32)
    first = tiny_direction(checkpoint, folder / "first.safetensors", seed=1)
    second = tiny_direction(checkpoint, folder / "second.safetensors", seed=2)
    keys = write_keys(folder / "keys.json")
    with running_server(
        *tiny_server_args(checkpoint, first),
        "--direction",
        str(second),
        "--api-keys-file",
        str(keys),
        "--strength-range=-1,1",
        "--max-num-seqs",
        "8",
        log_path=folder / "server.log",
    ) as url:
        yield url


def client(url: str, key: str = FULL_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def async_client(url: str, key: str = FULL_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def chat_kwargs(prompt: str = PROMPT, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 8,
        **extra,
    }


def post(url: str, path: str, body, key: str | None = FULL_KEY, **headers) -> httpx.Response:
    headers = {"Content-Type": "application/json", **headers}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=300)


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- routes -----------------------------------------------------------------------------------


def test_health_models_directions(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    directions = httpx.get(
        f"{server}/v1/directions", headers={"Authorization": f"Bearer {FULL_KEY}"}
    ).json()
    assert [d["name"] for d in directions["data"]] == ["refusal", "second"]
    assert directions["data"][0]["default"] is True
    assert directions["strength_range"] == [-1.0, 1.0]


def test_chat_reports_applied_ablation_from_header_and_body(server):
    api = client(server)
    raw = api.chat.completions.with_raw_response.create(
        **chat_kwargs(), extra_headers={"X-Ablation-Strength": "0.5"}
    )
    assert raw.headers["x-ablation-applied"] == "direction=refusal;strength=0.5"
    reply = raw.parse()
    assert reply.ablation == {"direction": "refusal", "strength": 0.5}
    raw = api.chat.completions.with_raw_response.create(
        **chat_kwargs(), extra_body={"ablation": {"strength": 1, "direction": "second"}}
    )
    assert raw.headers["x-ablation-applied"] == "direction=second;strength=1.0"
    baseline = api.chat.completions.with_raw_response.create(**chat_kwargs())
    assert baseline.headers["x-ablation-applied"] == "direction=none;strength=0.0"
    assert baseline.parse().usage.completion_tokens <= 8


def test_ablation_changes_tokens_and_baseline_is_stable(server):
    api = client(server)

    def ids(**extra) -> list[int]:
        reply = api.chat.completions.create(
            **chat_kwargs(max_tokens=12, extra_body={"return_token_ids": True, **extra})
        )
        return reply.choices[0].token_ids

    before = ids()
    ablated = ids(ablation={"strength": 1})
    assert ablated != before
    assert ids() == before  # nothing leaks from the ablated request


def test_streaming_matches_non_streaming(server):
    api = client(server)
    whole = api.chat.completions.create(
        **chat_kwargs(max_tokens=10), extra_headers={"X-Ablation-Strength": "1"}
    )
    chunks = list(
        api.chat.completions.create(
            **chat_kwargs(max_tokens=10),
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Ablation-Strength": "1"},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].ablation == {"direction": "refusal", "strength": 1.0}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[-1].ablation == {"direction": "refusal", "strength": 1.0}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_prompt_shapes_logprobs_and_stream(server):
    api = client(server)
    text = api.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        extra_body={"return_token_ids": True},
    )
    choice = text.choices[0]
    assert len(choice.logprobs.token_logprobs) == len(choice.token_ids) > 0
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    prompt_ids = [11, 12, 13, 14, 15]
    by_ids = api.completions.create(
        model=MODEL,
        prompt=prompt_ids,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert by_ids.usage.prompt_tokens == len(prompt_ids)
    streamed = list(
        api.completions.create(
            model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == by_ids.choices[0].text


def test_chat_logprobs_and_top_logprobs(server):
    reply = client(server).chat.completions.create(**chat_kwargs(logprobs=True, top_logprobs=3))
    content = reply.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) == 3 for item in content)
    assert all(item.logprob <= 0 for item in content)


def test_seeded_sampling_reproduces_and_n_choices(server):
    api = client(server)
    kwargs = chat_kwargs(
        temperature=1.0, seed=7, n=2, max_tokens=12, extra_body={"return_token_ids": True}
    )
    first, second = api.chat.completions.create(**kwargs), api.chat.completions.create(**kwargs)
    assert [c.token_ids for c in first.choices] == [c.token_ids for c in second.choices]
    assert len(first.choices) == 2


def test_stop_string_cuts_text(server):
    api = client(server)
    whole = api.chat.completions.create(**chat_kwargs(max_tokens=12)).choices[0].message.content
    words = whole.split()
    assert len(words) >= 3, whole
    stop = f" {words[2]}"
    cut = api.chat.completions.create(**chat_kwargs(max_tokens=12, stop=[stop])).choices[0]
    assert cut.message.content == whole[: whole.index(stop)]
    assert cut.finish_reason == "stop"


def test_metrics_count_requests_by_ablation(server):
    client(server).chat.completions.create(
        **chat_kwargs(), extra_headers={"X-Ablation-Strength": "1"}
    )
    text = httpx.get(f"{server}/metrics").text
    assert 'abliserve_requests_total{ablation="on",endpoint="chat"' in text
    assert "abliserve_requests_running" in text and "abliserve_requests_waiting" in text
    assert "abliserve_time_to_first_token_seconds_bucket" in text


# -- errors -----------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
LONG_PROMPT = " ".join(["cake"] * 200)  # the tiny model's context is 128 tokens


@pytest.mark.parametrize(
    ("body", "headers", "status", "param", "code"),
    [
        ('{"model": "tiny", "messages": [', {}, 400, None, "invalid_json"),
        ({**GOOD, "model": "gpt-9"}, {}, 404, "model", "model_not_found"),
        (
            GOOD,
            {"X-Ablation-Direction": "nope", "X-Ablation-Strength": "1"},
            400,
            "ablation.direction",
            "direction_not_found",
        ),
        (
            {**GOOD, "ablation": {"direction": "nope"}},
            {},
            400,
            "ablation.direction",
            "direction_not_found",
        ),
        (
            GOOD,
            {"X-Ablation-Strength": "lots"},
            400,
            "X-Ablation-Strength",
            "invalid_ablation_strength",
        ),
        (
            GOOD,
            {"X-Ablation-Strength": "nan"},
            400,
            "X-Ablation-Strength",
            "invalid_ablation_strength",
        ),
        (
            GOOD,
            {"X-Ablation-Strength": "inf"},
            400,
            "X-Ablation-Strength",
            "invalid_ablation_strength",
        ),
        (
            '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            '"ablation": {"strength": Infinity}}',
            {},
            400,
            "ablation.strength",
            "invalid_ablation_strength",
        ),
        ({**GOOD, "ablation": {"strength": "strong"}}, {}, 400, "ablation.strength", None),
        (
            {**GOOD, "ablation": {"strength": 1.5}},
            {},
            400,
            "ablation.strength",
            "strength_out_of_range",
        ),
        ({**GOOD, "ablation": {"strength": 1, "typo": 1}}, {}, 400, "ablation.typo", None),
        (
            {**GOOD, "ablation": {"strength": 0.5}},
            {"X-Ablation-Strength": "1"},
            400,
            "ablation.strength",
            "ablation_conflict",
        ),
        (
            {**GOOD, "ablation": {"direction": "second"}},
            {"X-Ablation-Direction": "refusal"},
            400,
            "ablation.direction",
            "ablation_conflict",
        ),
        (
            {**GOOD, "messages": [{"role": "user", "content": LONG_PROMPT}]},
            {},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({**GOOD, "max_tokens": 1000}, {}, 400, "max_tokens", "context_length_exceeded"),
        (
            {**GOOD, "max_completion_tokens": 1000},
            {},
            400,
            "max_completion_tokens",
            "context_length_exceeded",
        ),
        ({**GOOD, "temperature": 7}, {}, 400, "temperature", None),
        ({**GOOD, "max_tokens": 0}, {}, 400, "max_tokens", None),
        ({"model": MODEL}, {}, 400, "messages", None),
        (
            {**GOOD, "messages": [{"role": "robot", "content": "x"}]},
            {},
            400,
            "messages.0.role",
            None,
        ),
        ({**GOOD, "top_logprobs": 2}, {}, 400, "top_logprobs", None),
    ],
)
def test_bad_chat_input_gets_openai_error(server, body, headers, status, param, code):
    assert_error(post(server, "/v1/chat/completions", body, **headers), status, param, code)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": MODEL, "prompt": [5, 99999]}, "prompt", None),
        ({"model": MODEL, "prompt": []}, "prompt", None),
        ({"model": MODEL, "prompt": LONG_PROMPT}, "prompt", "context_length_exceeded"),
        ({"model": MODEL, "prompt": "cake", "echo": True}, "echo", None),
    ],
)
def test_bad_completion_input_gets_openai_error(server, body, param, code):
    assert_error(post(server, "/v1/completions", body), 400, param, code)


def test_unknown_route_is_openai_shaped(server):
    assert_error(
        httpx.get(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {FULL_KEY}"}), 404
    )


def test_openai_client_raises_its_usual_errors(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(**{**chat_kwargs(), "model": "gpt-9"})
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(**chat_kwargs(), extra_body={"ablation": {"strength": 9}})
    assert raised.value.code == "strength_out_of_range"


# -- keys and per-key policy --------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(server):
    assert_error(post(server, "/v1/chat/completions", GOOD, key=None), 401)
    assert_error(post(server, "/v1/chat/completions", GOOD, key="sk-wrong"), 401)
    assert_error(post(server, "/v1/chat/completions", "{not json", key="sk-wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").models.list()


def test_key_policies(server):
    plain = client(server, PLAIN_KEY)
    reply = plain.chat.completions.with_raw_response.create(**chat_kwargs())
    assert reply.headers["x-ablation-applied"] == "direction=none;strength=0.0"
    assert_error(
        post(server, "/v1/chat/completions", GOOD, key=PLAIN_KEY, **{"X-Ablation-Strength": "0.5"}),
        403,
        code="ablation_not_allowed",
    )
    assert_error(
        post(
            server, "/v1/chat/completions", GOOD, key=CAPPED_KEY, **{"X-Ablation-Strength": "0.8"}
        ),
        403,
        code="ablation_not_allowed",
    )
    assert_error(
        post(
            server, "/v1/chat/completions", GOOD, key=CAPPED_KEY, **{"X-Ablation-Strength": "-0.8"}
        ),
        403,
        code="ablation_not_allowed",
    )
    capped = client(server, CAPPED_KEY).chat.completions.with_raw_response.create(
        **chat_kwargs(), extra_headers={"X-Ablation-Strength": "0.5"}
    )
    assert capped.headers["x-ablation-applied"] == "direction=refusal;strength=0.5"


# -- concurrency --------------------------------------------------------------------------------


def mixed_requests() -> list[dict]:
    prompts = [PROMPT, "tell me about the weather", "write poem", "hack bank steal money please"]
    asks = [
        None,
        {"strength": 1},
        {"strength": 0.5, "direction": "second"},
        {"strength": -1, "direction": "second"},
        {"strength": 1, "direction": "second"},
    ]
    requests = []
    for i in range(16):
        body = {"return_token_ids": True}
        if asks[i % len(asks)] is not None:
            body["ablation"] = asks[i % len(asks)]
        requests.append(
            chat_kwargs(prompts[i % len(prompts)], max_tokens=6 + i % 5, extra_body=body)
        )
    return requests


def test_mixed_concurrent_batch_equals_solo_and_survives_bad_requests(server):
    """Invariant 3 on the tiny model, with bad requests and an abandoned stream in the mix."""
    requests = mixed_requests()
    api = client(server)
    solo = [api.chat.completions.create(**r).choices[0].token_ids for r in requests]

    async def together():
        api = async_client(server)

        async def bad(i: int):
            body = [
                {**GOOD, "model": "nope"},
                {**GOOD, "ablation": {"strength": "x"}},
                {"model": MODEL, "prompt": [99999]},
            ][i % 3]
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            async with httpx.AsyncClient() as http:
                return (
                    await http.post(
                        f"{server}{path}",
                        json=body,
                        timeout=300,
                        headers={"Authorization": f"Bearer {FULL_KEY}"},
                    )
                ).status_code

        async def abandoned():
            stream = await api.chat.completions.create(**chat_kwargs(max_tokens=50), stream=True)
            async for _ in stream:
                break
            await stream.close()

        good = [api.chat.completions.create(**r) for r in requests]
        noise = [bad(i) for i in range(6)] + [abandoned()]
        results = await asyncio.gather(*good[:8], *noise, *good[8:])
        return results[:8] + results[8 + len(noise) :], results[8 : 8 + len(noise)]

    replies, noise = asyncio.run(together())
    assert noise[:6] == [404, 400, 400] * 2
    assert [r.choices[0].token_ids for r in replies] == solo


def test_server_still_healthy_after_everything(server):
    assert httpx.get(f"{server}/health").status_code == 200
    # The abandoned stream above was aborted in the engine, not run to its 50 tokens.
    metrics = httpx.get(f"{server}/metrics").text
    assert 'endpoint="chat",finish_reason="abort"} 1.0' in metrics
    assert client(server).chat.completions.create(**chat_kwargs()).choices[0].message is not None


def test_serve_refuses_a_direction_for_another_model(tmp_path: Path):
    import subprocess
    import sys

    from abliserve.server.cli import demo_direction_path

    checkpoint = tiny_models.checkpoint(tmp_path / "model", "llama")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "abliserve.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--direction",
            str(demo_direction_path()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("abliserve: error: direction")
    assert "computed for" in result.stderr
