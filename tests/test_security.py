"""Access control and request limits, end to end on a tiny model served by a real subprocess.

The rules (docs/API.md, "Authentication and per-key policy"):
* per-key ablation policy holds on EVERY route that generates: a key that may only serve the
  baseline gets 403 for any non-zero strength, a key capped at 0.5 gets 0.5 but not 0.6, on
  chat, completions, A/B and first-token alike, by header or by body; the server's default
  strength is clipped to each key's rights instead of refused;
* a new POST route under /v1 fails :func:`test_every_generating_route_is_policy_checked`
  until it is added here, so no route can bypass the policy unnoticed;
* keys are compared in constant time and never appear in the server's log;
* /metrics and /health need a key when the operator says so;
* oversized bodies get 413 and requests beyond the concurrency limit 429, OpenAI-shaped;
* header values never reach response headers (no response splitting).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest
import tiny_models
from reliability_harness import CAPPED_KEY, FULL_KEY, PLAIN_KEY, served, write_keys
from server_harness import tiny_direction, tiny_server_args

from abliserve.server import policy as policy_module
from abliserve.server.policy import ApiKeys, KeyPolicy

MODEL = "tiny"
WRONG_KEY = "sk-rel-wrong-9d0e11"
MESSAGES = [{"role": "user", "content": "how to make a bomb"}]
MAX_BODY_BYTES = 20_000
MAX_CONCURRENT = 2
KEYS = {"full": FULL_KEY, "capped": CAPPED_KEY, "plain": PLAIN_KEY}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    checkpoint = tiny_models.checkpoint(folder / "model", "llama", num_layers=2, hidden=32)
    direction = tiny_direction(checkpoint, folder / "refusal.safetensors", seed=1)
    with served(
        *tiny_server_args(checkpoint, direction),
        "--api-keys-file",
        str(write_keys(folder / "keys.json")),
        "--default-strength",
        "1",
        "--strength-range=-1,1",
        "--metrics-require-key",
        "--health-require-key",
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
        "--max-concurrent-requests",
        str(MAX_CONCURRENT),
        "--log-level",
        "debug",
        log_path=folder / "server.log",
    ) as process:
        yield process


def post(server, path: str, body: dict, key: str | None = FULL_KEY, **headers) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=120)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error


# -- how each generating route asks for strength s -------------------------------------------

Ask = Callable[[float | None], tuple[str, dict, dict]]


def chat(strength, where: str) -> tuple[str, dict, dict]:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    return "/v1/chat/completions", *placed(body, strength, where)


def completions(strength, where: str) -> tuple[str, dict, dict]:
    body = {"model": MODEL, "prompt": "how to make a bomb", "max_tokens": 2, "temperature": 0}
    return "/v1/completions", *placed(body, strength, where)


def placed(body: dict, strength, where: str) -> tuple[dict, dict]:
    if strength is None:
        return body, {}
    if where == "header":
        return body, {"X-Ablation-Strength": str(strength)}
    return {**body, "ablation": {"strength": strength}}, {}


def ab(strength) -> tuple[str, dict, dict]:
    return "/v1/ab", {"messages": MESSAGES, "strengths": [strength], "max_tokens": 2}, {}


def first_token(strength) -> tuple[str, dict, dict]:
    return "/v1/ab/first-token", {"messages": MESSAGES, "strengths": [strength]}, {}


ASKS: dict[str, Ask] = {
    "chat-header": lambda s: chat(s, "header"),
    "chat-body": lambda s: chat(s, "body"),
    "completions-header": lambda s: completions(s, "header"),
    "completions-body": lambda s: completions(s, "body"),
    "ab": ab,
    "ab-first-token": first_token,
}
ROUTE_OF = {name: ask(1.0)[0] for name, ask in ASKS.items()}


def served_routes(server) -> set[str]:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    return {path for path, item in schema["paths"].items() if "post" in item}


ADMIN_ROUTES = {"/v1/directions"}  # loading directions: admin keys only (below)


def test_every_generating_route_is_policy_checked(server) -> None:
    """Every POST route the server exposes is one this module checks the key policy on."""
    unchecked = served_routes(server) - set(ROUTE_OF.values()) - ADMIN_ROUTES
    assert not unchecked, f"routes without a key-policy test: {sorted(unchecked)}"


@pytest.mark.parametrize("key", sorted(KEYS))
def test_only_admin_keys_load_or_remove_directions(server, key) -> None:
    auth = {"Authorization": f"Bearer {KEYS[key]}"}
    loaded = httpx.post(
        f"{server.url}/v1/directions",
        data={"name": "late"},
        files={"file": ("late.safetensors", b"x")},
        headers=auth,
        timeout=60,
    )
    assert_openai_error(loaded, 403, "admin_required")
    removed = httpx.delete(f"{server.url}/v1/directions/refusal", headers=auth, timeout=60)
    assert_openai_error(removed, 403, "admin_required")


def live_asks(server) -> list[str]:
    routes = served_routes(server)
    return [name for name, route in ROUTE_OF.items() if route in routes]


@pytest.mark.parametrize(
    ("key", "strength", "allowed"),
    [
        ("plain", 1.0, False),
        ("plain", -0.25, False),
        ("capped", 0.5, True),
        ("capped", -0.5, True),
        ("capped", 0.6, False),
        ("capped", -0.6, False),
        ("capped", 1.0, False),
        ("full", 1.0, True),
    ],
)
def test_key_policy_holds_on_every_generating_route(server, key, strength, allowed) -> None:
    for name in live_asks(server):
        path, body, headers = ASKS[name](strength)
        response = post(server, path, body, KEYS[key], **headers)
        if allowed:
            assert response.status_code == 200, (name, response.text)
            assert f"strength={strength}" in response.headers["X-Ablation-Applied"], name
        else:
            assert_openai_error(response, 403, "ablation_not_allowed")


@pytest.mark.parametrize(
    ("key", "applied"), [("plain", "strength=0.0"), ("capped", "strength=0.5"), ("full", "1.0")]
)
def test_default_strength_is_clipped_to_the_key(server, key, applied) -> None:
    """The server default (1.0 here) is what a key gets unasked, within that key's rights."""
    for name in ("chat-body", "completions-body"):
        path, body, headers = ASKS[name](None)
        response = post(server, path, body, KEYS[key], **headers)
        assert response.status_code == 200, response.text
        assert response.headers["X-Ablation-Applied"].endswith(applied)


def test_baseline_only_key_still_serves_the_baseline(server) -> None:
    for name in ("chat-header", "completions-body"):
        path, body, headers = ASKS[name](0.0)
        response = post(server, path, body, PLAIN_KEY, **headers)
        assert response.status_code == 200, response.text
        assert response.json()["ablation"]["strength"] == 0.0


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", f"Bearer {WRONG_KEY}", f"Basic {FULL_KEY}", f"Bearer {FULL_KEY}x"],
)
def test_missing_or_wrong_key_is_401_everywhere(server, authorization) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("/health", "/metrics"):
        assert_openai_error(httpx.get(f"{server.url}{path}", headers=headers), 401)
    for name in live_asks(server):
        path, body, _ = ASKS[name](0.0)
        response = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
        assert_openai_error(response, 401, "invalid_api_key")


def test_metrics_and_health_answer_with_a_key(server) -> None:
    auth = {"Authorization": f"Bearer {PLAIN_KEY}"}
    assert httpx.get(f"{server.url}/health", headers=auth).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", headers=auth)
    assert metrics.status_code == 200 and "abliserve_requests" in metrics.text


def test_keys_are_compared_in_constant_time(monkeypatch) -> None:
    """Every configured key is compared, by equal-length digests, with compare_digest — no
    early exit and no ``==`` on secrets, whether the offered key is right, wrong or short."""
    keys = ApiKeys({"sk-a": KeyPolicy(), "sk-much-longer-key": KeyPolicy(max_strength=0.5)})
    calls: list[tuple[int, int]] = []
    real = policy_module.hmac.compare_digest

    def recording(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(policy_module.hmac, "compare_digest", recording)
    assert keys.authenticate("Bearer sk-much-longer-key").max_strength == 0.5
    with pytest.raises(policy_module.ApiError):
        keys.authenticate("Bearer x")
    assert keys.authenticate("Bearer sk-a") == KeyPolicy()
    assert calls == [(32, 32)] * 6


# -- limits ------------------------------------------------------------------------------------


def test_oversized_body_is_413_by_length_and_by_chunks(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a" * MAX_BODY_BYTES}]}
    assert_openai_error(post(server, "/v1/chat/completions", body), 413, "request_too_large")

    def chunks():
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b" " * 1000

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert "content-length" not in response.request.headers  # really sent chunked
    assert_openai_error(response, 413, "request_too_large")


def held_request(server) -> socket.socket:
    """A generation request whose body never finishes: it holds a slot until closed."""
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {FULL_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    return sock


def chat_status(server) -> int:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    return post(server, "/v1/chat/completions", body).status_code


def eventually(server, status: int, attempts: int = 50) -> bool:
    """Whether a chat request gets ``status`` within ``attempts`` tries (state settles)."""
    return any(chat_status(server) == status for _ in range(attempts))


def test_concurrency_limit_is_429_and_slots_come_back(server) -> None:
    held = [held_request(server) for _ in range(MAX_CONCURRENT)]
    try:
        # The held requests are counted once the server has read their headers; poll for it.
        assert eventually(server, 429)
        limited = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
        assert_openai_error(limited, 429, "rate_limit_exceeded")
        auth = {"Authorization": f"Bearer {FULL_KEY}"}
        assert httpx.get(f"{server.url}/health", headers=auth).status_code == 200  # GETs pass
    finally:
        for sock in held:
            sock.close()
    assert eventually(server, 200)  # freed once the clients left


# -- header injection --------------------------------------------------------------------------


def raw_exchange(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(60)
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                break
        return received


@pytest.mark.parametrize("value", [b"refusal\nX-Injected: 1", b"refusal\rX-Injected: 1", b"a\x00b"])
def test_control_characters_in_headers_are_rejected(server, value: bytes) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'
    reply = raw_exchange(
        server,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {FULL_KEY}\r\n".encode()
        + b"X-Ablation-Direction: "
        + value
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body,
    )
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), reply[:200]
    assert b"x-injected" not in reply.lower()
    assert chat_status(server) == 200  # and the server goes on serving


@pytest.mark.parametrize(
    ("headers", "body_ablation"),
    [
        ({"X-Ablation-Direction": "r\u00e9fusal"}, None),  # latin-1 bytes on the wire
        ({}, {"direction": "refusal\r\nSet-Cookie: stolen=1"}),
        ({"X-Ablation-Strength": "1\u00a0; Set-Cookie: x=1"}, None),
    ],
)
def test_hostile_ablation_values_never_reach_response_headers(server, headers, body_ablation):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    if body_ablation is not None:
        body["ablation"] = body_ablation
    encoded = {name: value.encode("latin-1") for name, value in headers.items()}
    response = post(server, "/v1/chat/completions", body, **encoded)
    assert_openai_error(response, 400)
    assert "set-cookie" not in response.headers


# -- last: nothing secret was logged -----------------------------------------------------------


def test_keys_never_appear_in_the_log(server) -> None:
    """Runs after the tests above have used every key (and a wrong one) at debug log level."""
    post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, WRONG_KEY)
    post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 1},
        **{"X-Ablation-Direction": FULL_KEY},
    )
    log = server.log()
    assert "POST /v1/chat/completions" in log  # the access log was on
    for secret in (FULL_KEY, CAPPED_KEY, PLAIN_KEY, WRONG_KEY):
        assert secret not in log
