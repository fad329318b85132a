"""Who may talk to the server at all, checked before anything reads the request's body.

A pure ASGI middleware, outside the limits middleware, so a request that fails here costs the
server nothing: no concurrency slot is taken, no body byte is read and no ``100 Continue`` is
sent (uvicorn sends it on the first read). In order:

* ``Host`` must name this server: the localhost names, the bind address and ``--allowed-hosts``
  (any host when bound to a wildcard address without that flag). A web page that points its own
  DNS name at 127.0.0.1 (DNS rebinding) sends its own name, so it gets 400 and reads nothing;
* the API key (401) on ``/v1/`` and on the paths the operator asked to protect; the key's policy
  goes to the routes as ``request.state.key_policy``;
* a POST body must be declared ``application/json`` (415). Browsers send other types to any
  origin without asking (a CORS "simple request"); JSON only after a preflight, which this
  server answers only for ``--allowed-origins``. So a page the user visits cannot make a local,
  key-less server generate. The one exception is a direction upload (``multipart/form-data``
  to ``/v1/directions``): that route serves admin keys only, and a browser sends an
  ``Authorization`` header only after a preflight too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from abliserve.server.errors import ApiError
from abliserve.server.limits import UPLOAD_PATH
from abliserve.server.policy import ApiKeys

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
ANY_HOST = "*"
JSON_MEDIA_TYPE = "application/json"
UPLOAD_MEDIA_TYPE = "multipart/form-data"


def allowed_hosts(bind: str, extra: list[str]) -> frozenset[str] | None:
    """The ``Host`` names to accept (None: any): localhost names, the bind address, ``extra``.

    A wildcard bind without ``extra`` accepts any host, since its names are unknown here."""
    if ANY_HOST in extra or (bind in WILDCARD_BINDS and not extra):
        return None
    return LOCAL_HOSTS | {host_name(bind)} | {host_name(name) for name in extra}


def host_name(value: str) -> str:
    """``example.com:8000`` → ``example.com``; ``[::1]:8000`` → ``::1``; lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class AccessRules:
    """What the guard checks; ``hosts`` None accepts any ``Host``."""

    keys: ApiKeys = field(default_factory=ApiKeys)
    hosts: frozenset[str] | None = None
    keyed_paths: frozenset[str] = frozenset()  # besides /v1/: /metrics, /health on request


class GuardMiddleware:
    """Enforce :class:`AccessRules`; ``on_reject(status)`` counts refusals for /metrics."""

    def __init__(self, app, rules: AccessRules, on_reject: Callable[[int], None]) -> None:
        self.app = app
        self.rules = rules
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            try:
                self.check(scope)
            except ApiError as error:
                self.on_reject(error.status)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> None:
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        hosts = self.rules.hosts
        if hosts is not None and host_name(headers.get(b"host", "")) not in hosts:
            raise ApiError(
                400,
                "the Host header does not name this server (an operator can accept more names "
                "with --allowed-hosts)",
                code="host_not_allowed",
            )
        path = scope["path"]
        if path.startswith("/v1/") or path in self.rules.keyed_paths:
            scope.setdefault("state", {})["key_policy"] = self.rules.keys.authenticate(
                headers.get(b"authorization")
            )
        if scope["method"] == "POST":
            media_type = headers.get(b"content-type", "").split(";", 1)[0].strip().lower()
            upload = path == UPLOAD_PATH and media_type == UPLOAD_MEDIA_TYPE
            if media_type != JSON_MEDIA_TYPE and not upload:
                raise ApiError(
                    415,
                    f"POST bodies must be sent as Content-Type: {JSON_MEDIA_TYPE}",
                    code="unsupported_media_type",
                )
