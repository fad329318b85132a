"""A short soak with hostile and honest clients mixed, on a tiny model served by a real
subprocess: honest answers stay token-identical to their solo runs, nobody gets a 5xx, and
every hostile client gets its 4xx (or its bounded answer) at once.

Honest clients: greedy chat requests over 3 prompts x 3 strengths, streamed or not, with a key
that may ablate. Hostile clients, all at the same time: unauthenticated sockets that never send
their body, authenticated ones that trickle it, ``Expect: 100-continue`` without a key, 60,000
stop strings, JSON nested 100,000 deep, text/plain bodies, a foreign Host, a key in the query
string, a 100 kB model name, a key pasted in the strength header, eight zero-strength
first-token variants, non-finite strengths. Sizes are constants below (the whole test takes
well under a minute here).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from reliability_harness import FULL_KEY, PLAIN_KEY, write_keys
from server_harness import chat_token_ids, tiny_served

MODEL = "tiny"
PROMPTS = ["how to make a cake", "tell me about the weather", "write a poem"]
STRENGTHS = [0.0, 0.5, 1.0]
HONEST_ROUNDS = 2  # each (prompt, strength, stream) configuration this many times
MAX_TOKENS = 8
HOSTILE_ROUNDS = 2  # each hostile client below this many times
BODY_TIMEOUT_S = 2
TIMEOUT_S = 120  # a hang guard


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak-hostile")
    with tiny_served(
        folder,
        *("--api-keys-file", str(write_keys(folder / "keys.json")), "--strength-range=-1,1"),
        *("--body-timeout", str(BODY_TIMEOUT_S), "--max-num-seqs", "8"),
    ) as process:
        yield process


def honest_body(prompt: str, strength: float, stream: bool) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
        "ablation": {"strength": strength},
    }


async def honest(client: httpx.AsyncClient, prompt: str, strength: float, stream: bool):
    """(status, token ids) of one honest request."""
    return await chat_token_ids(client, honest_body(prompt, strength, stream), AUTH)


def raw_head(path: str, *lines: str) -> bytes:
    fields = ["Host: 127.0.0.1", "Content-Type: application/json", *lines]
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


RAW_CLIENTS = {  # name: (bytes sent, then nothing more; expected status)
    "idle, no key": (raw_head("/v1/chat/completions", "Content-Length: 100"), 401),
    "100-continue, no key": (
        raw_head("/v1/chat/completions", "Content-Length: 100", "Expect: 100-continue"),
        401,
    ),
    "slow body": (
        raw_head("/v1/chat/completions", f"Authorization: Bearer {FULL_KEY}", "Content-Length: 99")
        + b'{"mod',
        408,
    ),
}
DEEP = b"[" * 100_000 + b"]" * 100_000
MESSAGES = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"}
HTTP_CLIENTS = {  # name: (path, body bytes, headers, expected status)
    "60000 stops": (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES, "n": 16, "stop": ["s"] * 60_000}),
        AUTH,
        400,
    ),
    "deep json": (
        "/v1/chat/completions",
        b'{"model": "tiny", "messages": ' + DEEP + b"}",
        AUTH,
        400,
    ),
    "text/plain": (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES}),
        {**AUTH, "Content-Type": "text/plain"},
        415,
    ),
    "foreign host": (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES}),
        {**AUTH, "Host": "rebound.example"},
        400,
    ),
    "key in query": (
        f"/v1/chat/completions?api_key={FULL_KEY}",
        json.dumps({"model": MODEL, "messages": MESSAGES}),
        {"Content-Type": "application/json"},
        401,
    ),
    "huge model name": (
        "/v1/chat/completions",
        json.dumps({"model": "m" * 100_000, "messages": MESSAGES}),
        AUTH,
        404,
    ),
    "key in strength header": (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES}),
        {**AUTH, "X-Ablation-Strength": FULL_KEY},
        400,
    ),
    "zero variants": (
        "/v1/ab/first-token",
        json.dumps({"messages": MESSAGES, "strengths": [0.0] * 8}),
        {**AUTH, "Authorization": f"Bearer {PLAIN_KEY}"},
        200,
    ),
    "nan strength": (
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], '
        '"ablation": {"strength": NaN}}',
        AUTH,
        400,
    ),
}


async def raw_status(port: int, sent: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sent)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT_S)
        return int(line.split(b" ")[1])
    finally:
        writer.close()


def test_hostile_clients_do_not_disturb_honest_ones(server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    configs = [(p, s, stream) for p in PROMPTS for s in STRENGTHS for stream in (False, True)]

    async def scenario():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=TIMEOUT_S, limits=limits
        ) as client:
            solo = {
                (p, s): (await honest(client, p, s, False))[1] for p in PROMPTS for s in STRENGTHS
            }
            honest_runs = [honest(client, *config) for config in configs * HONEST_ROUNDS]
            raw_runs = [
                raw_status(port, sent) for sent, _ in list(RAW_CLIENTS.values()) * HOSTILE_ROUNDS
            ]
            http_runs = [
                client.post(path, content=body, headers=headers)
                for path, body, headers, _ in list(HTTP_CLIENTS.values()) * HOSTILE_ROUNDS
            ]
            results = await asyncio.gather(*honest_runs, *raw_runs, *http_runs)
            return solo, results

    solo, results = asyncio.run(scenario())
    honest_results = results[: len(configs) * HONEST_ROUNDS]
    raw_results = results[
        len(honest_results) : len(honest_results) + len(RAW_CLIENTS) * HOSTILE_ROUNDS
    ]
    http_results = results[len(honest_results) + len(raw_results) :]
    for (prompt, strength, _), (status, tokens) in zip(
        configs * HONEST_ROUNDS, honest_results, strict=True
    ):
        assert status == 200
        assert tokens == solo[prompt, strength] and len(tokens) == MAX_TOKENS
    expected_raw = [status for _, status in RAW_CLIENTS.values()] * HOSTILE_ROUNDS
    assert raw_results == expected_raw
    for (name, (_, _, _, expected)), response in zip(
        list(HTTP_CLIENTS.items()) * HOSTILE_ROUNDS, http_results, strict=True
    ):
        assert response.status_code == expected, (name, response.text[:200])
        assert FULL_KEY not in response.text, name
    assert server.process.poll() is None
    metrics = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT_S).text
    assert 'abliserve_request_errors_total{status="500"}' not in metrics
    assert FULL_KEY not in server.log()
