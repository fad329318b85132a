"""Request limits enforced before any route runs: body size (413), concurrency (429), slow
bodies (408), and cancellation when the client leaves.

A pure ASGI middleware (not ``BaseHTTPMiddleware``) so it sees the raw body stream and the
whole life of a streaming response. It runs inside :mod:`abliserve.server.guard`, so only
requests that passed the key check are counted or have their body read:

* a body over ``max_body_bytes`` (``max_upload_bytes`` for direction uploads) is refused from
  its ``Content-Length`` before a byte is read, and a chunked body is cut off as soon as it
  grows past the limit, so a huge upload never sits in memory or reaches JSON parsing or the
  tokenizer. The body (at most the limit) is read here and handed to the app in one message; a
  body not complete within ``body_timeout_s`` is a 408, so a client trickling bytes cannot hold
  a slot. Only POST bodies are read: the GET routes take none, and reading one nobody asked
  for would only cost memory;
* at most ``max_concurrent_requests`` generation requests (POSTs under ``/v1/``) are in flight,
  counted from arrival until their last response byte (streams included); one more gets an
  immediate 429 instead of queueing without bound in the engine. Cheap GETs are never limited,
  so ``/health`` and ``/metrics`` keep answering under overload;
* a client that disconnects before its response is complete has its request cancelled, which
  aborts its engine requests and frees their batch slots (non-streaming requests included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from abliserve.server.errors import ApiError

DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # ~250k tokens of text, far beyond any context we serve
DEFAULT_MAX_CONCURRENT_REQUESTS = 256
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a direction for an 80-layer, 8k-wide model: ~5 MB
UPLOAD_PATH = "/v1/directions"  # the one route whose body is a file, not a JSON request


@dataclass(frozen=True)
class RequestLimits:
    """The ``serve`` flags ``--max-body-bytes``, ``--max-concurrent-requests``,
    ``--body-timeout`` and ``--max-direction-bytes``."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # direction uploads (POST /v1/directions)

    def body_limit(self, path: str) -> int:
        """The largest body accepted on ``path``: direction uploads have their own limit."""
        return self.max_upload_bytes if path == UPLOAD_PATH else self.max_body_bytes


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )


def over_capacity(limit: int) -> ApiError:
    return ApiError(
        429,
        f"the server is at its limit of {limit} concurrent requests; retry later",
        code="rate_limit_exceeded",
    )


class Slots:
    """The concurrency budget: one slot per generation request (taken by the middleware), plus
    one per extra engine request for routes that fan out (``request.state.slots``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # one event loop: plain int arithmetic cannot race

    def take(self, count: int = 1) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        return True

    def give(self, count: int = 1) -> None:
        self.used -= count

    @contextmanager
    def extra(self, count: int) -> Iterator[None]:
        """Hold ``count`` more slots for the block, or raise 429 at once."""
        if not self.take(count):
            raise over_capacity(self.limit)
        try:
            yield
        finally:
            self.give(count)


class LimitsMiddleware:
    """Enforce :class:`RequestLimits`; ``on_reject(status)`` counts refusals for /metrics."""

    def __init__(self, app, limits: RequestLimits, on_reject: Callable[[int], None]) -> None:
        self.app = app
        self.limits = limits
        self.on_reject = on_reject
        self.slots = Slots(limits.max_concurrent_requests)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limits.body_limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._reject(body_too_large(limit), scope, receive, send)
            return
        counted = scope["path"].startswith("/v1/")
        if counted and not self.slots.take():
            await self._reject(
                over_capacity(self.limits.max_concurrent_requests), scope, receive, send
            )
            return
        if counted:
            scope.setdefault("state", {})["slots"] = self.slots
        try:
            try:
                body = await asyncio.wait_for(
                    self._read_body(receive, limit), self.limits.body_timeout_s
                )
            except _ClientLeft:
                return  # nobody to answer
            except asyncio.TimeoutError:
                timeout = ApiError(
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                    code="request_timeout",
                )
                await self._reject(timeout, scope, receive, send)
                return
            if body is None:
                await self._reject(body_too_large(limit), scope, receive, send)
                return
            replayed = False

            async def replay():
                """The body in one message, then the client's own messages (disconnects)."""
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await _cancel_on_disconnect(lambda out: self.app(scope, replay, out), receive, send)
        finally:
            if counted:
                self.slots.give()

    async def _read_body(self, receive, limit: int) -> bytes | None:
        """The whole body, or None once it grows past the limit (reading stops there)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientLeft
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(parts)

    async def _reject(self, error: ApiError, scope, receive, send) -> None:
        self.on_reject(error.status)
        await error.response()(scope, receive, send)


async def _cancel_on_disconnect(app_call, receive, send) -> None:
    """Run the app; if the client disconnects before the response is complete, cancel it.

    Routes cannot reliably see a disconnect themselves (``BaseHTTPMiddleware`` hides it from
    ``Request.is_disconnected``), so a non-streaming request would keep its engine slot until
    its last token. Cancelling the route closes its generation streams, which aborts the
    engine requests. Called once the body is read, so the only message left is the disconnect.
    """
    complete = False

    async def tracking_send(message) -> None:
        nonlocal complete
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete = True

    app = asyncio.ensure_future(app_call(tracking_send))
    watcher = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not app.done() and not complete:
            app.cancel()
        await asyncio.gather(app, return_exceptions=True)
    finally:
        watcher.cancel()
        if not app.done():
            app.cancel()
    if not app.cancelled():
        app.result()  # re-raise what the app raised


class _ClientLeft(Exception):
    """The client disconnected before sending its whole body."""


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
