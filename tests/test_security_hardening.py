"""Regression tests for an adversarial review of the HTTP server (hostile clients,
unauthenticated load, hostile artifacts), on a tiny model served by a real subprocess.

Each test failed on the server before its fix (docs/RELIABILITY.md lists what each found):
long stop lists, unauthenticated sockets holding capacity, slow or unwanted bodies,
``Expect: 100-continue`` before the key check, deeply nested JSON, an unbounded first-token
route, an effective strength above a key's cap, keys in logged query strings, any Host or
Content-Type accepted, echoed header values, non-ASCII keys, hostile artifacts at start-up.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tiny_models
import torch
from reliability_harness import CAPPED_KEY, FULL_KEY, PLAIN_KEY, served, write_keys
from safetensors.torch import save_file
from server_harness import tiny_direction, tiny_server_args

from abliserve.directions.artifact import METADATA_KEY, DirectionArtifact, load_artifact
from abliserve.server.protocol import MAX_STOP_STRINGS

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "hello"}]
MAX_CONCURRENT = 2
BODY_TIMEOUT_S = 2
ORIGIN = "https://app.example"
EXTRA_HOST = "served.example"
QUERY_SECRET = "sk-in-the-url-5e1f0a"
REPLY_TIMEOUT_S = 60  # a hang guard: every answer below comes at once on the fixed server
GENERATING_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/ab", "/v1/ab/first-token")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hardening")
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=2, hidden=32)
    direction = tiny_direction(checkpoint, folder / "refusal.safetensors", seed=1)
    strong = load_artifact(direction)
    strong.weights = torch.full_like(strong.weights, 2.0)  # every site counts double
    return {
        "folder": folder,
        "checkpoint": checkpoint,
        "direction": direction,
        "strong": strong.save(folder / "strong.safetensors"),
        "keys": write_keys(folder / "keys.json"),
    }


@pytest.fixture(scope="module")
def server(files):
    with served(
        *tiny_server_args(files["checkpoint"], files["direction"]),
        *("--direction", f"strong={files['strong']}"),
        *("--api-keys-file", str(files["keys"]), "--strength-range=-1,1"),
        *("--max-concurrent-requests", str(MAX_CONCURRENT)),
        *("--body-timeout", str(BODY_TIMEOUT_S), "--health-require-key"),
        *("--allowed-origins", ORIGIN, "--allowed-hosts", EXTRA_HOST),
        *("--log-level", "debug"),
        log_path=files["folder"] / "server.log",
    ) as process:
        yield process


def post(server, path: str, body, key: str | None = FULL_KEY, **headers) -> httpx.Response:
    headers = {"Content-Type": "application/json", **headers}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}", content=content, headers=headers, timeout=REPLY_TIMEOUT_S
    )


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **fields}


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.settimeout(REPLY_TIMEOUT_S)
    return sock


def head(path: str, *lines: str, method: str = "POST") -> bytes:
    """A request head with a good Host and JSON type, plus ``lines``, without a body."""
    fields = ["Host: 127.0.0.1", "Content-Type: application/json", *lines]
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


def status_of(sock: socket.socket) -> bytes:
    """The first status line the server sends on ``sock`` (a timeout fails the test)."""
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0]


# -- 1. stop lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop",
    [
        [f"s{i}" for i in range(60_000)],  # froze the server for 25 s with n=16
        [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)],
        ["x" * 3000, "y" * 3000],
    ],
    ids=["60000 strings", "one too many", "too many characters"],
)
def test_long_stop_lists_are_refused(server, stop) -> None:
    for route, body in (
        ("/v1/chat/completions", chat(stop=stop, n=16)),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2, "stop": stop}),
        ("/v1/ab", {"messages": MESSAGES, "strengths": [0.5], "max_tokens": 2, "stop": stop}),
    ):
        assert error_of(post(server, route, body), 400)["param"] == "stop", route


def test_the_largest_allowed_stop_list_still_answers(server) -> None:
    stop = [f"{i:03d}" + "z" * 200 for i in range(MAX_STOP_STRINGS)]
    response = post(server, "/v1/chat/completions", chat(stop=stop, n=4))
    assert response.status_code == 200, response.text


# -- 2. unauthenticated load, slow and unwanted bodies -----------------------------------------


def test_unauthenticated_sockets_cannot_take_the_servers_capacity(server) -> None:
    """Sockets that send headers (no key) and then nothing once held every slot, so a valid
    key got 429 while they stayed open. Now each gets 401 at once and holds nothing."""
    idle = [connect(server) for _ in range(3 * MAX_CONCURRENT)]
    try:
        for sock in idle:
            sock.sendall(head("/v1/chat/completions", "Content-Length: 100"))
        for sock in idle:
            assert status_of(sock).startswith(b"HTTP/1.1 401"), "no early 401"
        assert post(server, "/v1/chat/completions", chat()).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_expect_100_continue_is_not_answered_before_the_key_check(server) -> None:
    with connect(server) as sock:
        sock.sendall(head("/v1/chat/completions", "Content-Length: 100", "Expect: 100-continue"))
        assert status_of(sock).startswith(b"HTTP/1.1 401")


def test_a_slow_body_times_out_with_408_and_frees_its_slot(server) -> None:
    held = [connect(server) for _ in range(MAX_CONCURRENT)]
    try:
        for sock in held:
            sock.sendall(
                head(
                    "/v1/chat/completions",
                    f"Authorization: Bearer {FULL_KEY}",
                    "Content-Length: 100",
                )
                + b'{"model"'
            )
        for sock in held:
            assert status_of(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in held:
            sock.close()
    assert post(server, "/v1/chat/completions", chat()).status_code == 200


def test_a_get_body_is_never_waited_for_or_read(server) -> None:
    """GET /health with a declared body that never comes: answered at once (it was read, and
    waited for, by the limits middleware)."""
    with connect(server) as sock:
        sock.sendall(
            head(
                "/health",
                f"Authorization: Bearer {FULL_KEY}",
                "Content-Length: 100000",
                method="GET",
            )
        )
        assert status_of(sock).startswith(b"HTTP/1.1 200")


# -- 3. deeply nested JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("route", GENERATING_ROUTES)
@pytest.mark.parametrize("where", ["messages", "ignored field"])
def test_deeply_nested_json_is_400(server, route: str, where: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "messages":
        body = b'{"model": "tiny", "messages": ' + deep + b"}"
    else:
        body = (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "x": ' + deep + b"}"
        )
    error_of(post(server, route, body), 400, "invalid_json")
    assert "Traceback" not in server.log()


# -- 4. first-token cost -----------------------------------------------------------------------


def test_first_token_runs_each_distinct_variant_once(server) -> None:
    """Eight zero strengths from a key without ablation rights: one engine request (it needs
    one slot), and the answer still has a variant per requested strength."""
    body = {"messages": MESSAGES, "strengths": [0.0] * 8, "top_logprobs": 2}
    response = post(server, "/v1/ab/first-token", body, PLAIN_KEY)
    assert response.status_code == 200, response.text
    variants = response.json()["variants"]
    assert len(variants) == 9 and {v["kl_from_baseline"] for v in variants} == {0.0}


def test_first_token_variants_count_against_the_concurrency_limit(server) -> None:
    fits = {"messages": MESSAGES, "strengths": [0.5] * (MAX_CONCURRENT + 3)}
    assert post(server, "/v1/ab/first-token", fits).status_code == 200
    too_many = {"messages": MESSAGES, "strengths": [0.25, 0.5, 0.75][:MAX_CONCURRENT]}
    error_of(post(server, "/v1/ab/first-token", too_many), 429, "rate_limit_exceeded")


def test_first_token_needs_ablation_rights_for_non_zero_variants(server) -> None:
    body = {"messages": MESSAGES, "strengths": [0.0, 0.1]}
    error_of(post(server, "/v1/ab/first-token", body, PLAIN_KEY), 403, "ablation_not_allowed")


# -- 5. the key cap is on the effective strength -------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "strength", "allowed"),
    [
        ("refusal", 0.5, True),
        ("strong", 0.5, False),
        ("strong", 0.25, True),
        ("strong", -0.3, False),
    ],
)
def test_a_capped_key_is_capped_on_strength_times_site_weight(server, direction, strength, allowed):
    """The capped key (0.5) on a direction whose sites weigh 2: strength 0.5 removes it at an
    effective 1.0, which the cap refuses; 0.25 (effective 0.5) is fine."""
    body = chat(ablation={"strength": strength, "direction": direction})
    response = post(server, "/v1/chat/completions", body, CAPPED_KEY)
    if allowed:
        assert response.status_code == 200, response.text
    else:
        error_of(response, 403, "ablation_not_allowed")


# -- 7. Host, Content-Type, CORS ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.2", ""])
def test_unknown_host_headers_are_refused(server, host: str) -> None:
    headers = {"Host": host, "Authorization": f"Bearer {FULL_KEY}"}
    response = httpx.get(f"{server.url}/health", headers=headers, timeout=REPLY_TIMEOUT_S)
    error_of(response, 400, "host_not_allowed")
    error_of(post(server, "/v1/chat/completions", chat(), Host=host), 400, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1", "[::1]:9", EXTRA_HOST])
def test_local_and_configured_hosts_are_served(server, host: str) -> None:
    assert post(server, "/v1/chat/completions", chat(), Host=host).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
def test_post_bodies_must_be_declared_json(server, content_type: str) -> None:
    """A browser sends these cross-site without a preflight; they used to parse as JSON."""
    response = post(server, "/v1/chat/completions", chat(), **{"Content-Type": content_type})
    error_of(response, 415, "unsupported_media_type")


def test_cors_answers_only_the_allowed_origin(server) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for origin, allowed in ((ORIGIN, True), ("https://evil.example", False)):
        response = httpx.options(
            f"{server.url}/v1/chat/completions",
            headers={"Origin": origin, **preflight},
            timeout=REPLY_TIMEOUT_S,
        )
        assert (response.headers.get("access-control-allow-origin") == origin) is allowed
    answer = post(server, "/v1/chat/completions", chat(), Origin=ORIGIN)
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-ablation-applied" in answer.headers["access-control-expose-headers"].lower()


# -- 8. echoes ---------------------------------------------------------------------------------


def test_header_values_and_keys_are_never_echoed(server) -> None:
    for headers in (
        {"X-Ablation-Strength": FULL_KEY},
        {"X-Ablation-Direction": FULL_KEY},
        {"X-Ablation-Direction": "d" * 8000},
    ):
        response = post(server, "/v1/chat/completions", chat(), **headers)
        message = error_of(response, 400)["message"]
        assert FULL_KEY not in response.text and len(message) < 300, message


def test_long_body_values_are_truncated_in_errors(server) -> None:
    response = post(server, "/v1/chat/completions", chat(model="m" * 100_000))
    assert len(error_of(response, 404, "model_not_found")["message"]) < 200


# -- 6. query strings in the access log (last: it reads the whole log) -------------------------


def test_query_strings_never_reach_the_access_log(server) -> None:
    post(server, f"/v1/chat/completions?api_key={QUERY_SECRET}", chat(), key=None)
    httpx.get(f"{server.url}/health?api_key={QUERY_SECRET}", timeout=REPLY_TIMEOUT_S)
    log = server.log()
    assert "POST /v1/chat/completions?[query redacted]" in log  # the access log was on
    assert QUERY_SECRET not in log
    for key in (FULL_KEY, CAPPED_KEY, PLAIN_KEY):
        assert key not in log


# -- 5, 9. start-up: hostile artifacts and keys are one line, exit 2 ---------------------------


def start_failure(files: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        *("-m", "abliserve.cli", "serve", "--port", "1", "--engine", "transformers"),
        *("--model", str(files["checkpoint"]), *args),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def hostile_artifact(files: dict[str, Path], name: str, metadata_text: str) -> Path:
    artifact = load_artifact(files["direction"])
    tensors = {"directions": artifact.directions, "weights": artifact.weights}
    path = files["folder"] / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: metadata_text})
    return path


def good_metadata(files: dict[str, Path]) -> dict:
    return load_artifact(files["direction"]).metadata()


@pytest.mark.parametrize(
    "case",
    ["metadata nested 100k deep", "ANSI model_id", "non-ASCII --api-key", "non-ASCII key in file"],
)
def test_hostile_start_up_input_is_one_clean_line(files, case: str) -> None:
    if case == "metadata nested 100k deep":
        text = json.dumps(good_metadata(files)).replace('"scores": {}', '"scores": {"d": HOLE}')
        args = [
            "--direction",
            str(
                hostile_artifact(files, "deep", text.replace("HOLE", "[" * 100_000 + "]" * 100_000))
            ),
        ]
    elif case == "ANSI model_id":
        metadata = good_metadata(files)
        metadata["model"]["model_id"] = "\x1b[2J\x1b[31mowned"
        args = ["--direction", str(hostile_artifact(files, "ansi", json.dumps(metadata)))]
    elif case == "non-ASCII --api-key":
        args = ["--api-key", "sk-clé"]
    else:
        keys = files["folder"] / "unicode-keys.json"
        keys.write_text(json.dumps({"keys": {"sk-ключ": {"allow_ablation": True}}}))
        args = ["--api-keys-file", str(keys)]
    result = start_failure(files, *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abliserve: error: "), result.stderr
    assert "\x1b" not in result.stderr and "Traceback" not in result.stderr
    assert "clé" not in result.stderr and "ключ" not in result.stderr  # keys are not shown


def test_an_effective_strength_of_two_is_the_documented_maximum(files) -> None:
    """A direction with site weights of 2 loads (the range is [0, MAX_SITE_WEIGHT])."""
    assert isinstance(load_artifact(files["strong"]), DirectionArtifact)


def test_server_survived_everything(server) -> None:
    assert server.process.poll() is None
    auth = {"Authorization": f"Bearer {FULL_KEY}"}
    assert (
        httpx.get(f"{server.url}/health", headers=auth, timeout=REPLY_TIMEOUT_S).status_code == 200
    )
    metrics = httpx.get(f"{server.url}/metrics", headers=auth, timeout=REPLY_TIMEOUT_S).text
    assert 'abliserve_request_errors_total{status="500"}' not in metrics
