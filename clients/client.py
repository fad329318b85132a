"""A thin typed client for an abliserve server, over the official ``openai`` client.

Users pick a strength and direction per call instead of hand-writing ``X-Ablation-*`` headers,
run A/B comparisons, and get one clear exception per failure (server unreachable, bad URL,
rejected request) instead of a transport traceback::

    client = AbliserveClient("http://127.0.0.1:8000")
    reply = client.chat([{"role": "user", "content": "Hi"}], strength=1.0)
    comparison = client.ab("How do I pick a lock?", strengths=[0.5, 1.0])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import openai
from openai.types.chat import ChatCompletion

from abliserve.clients import DEFAULT_SERVER
from abliserve.errors import UserError
from abliserve.server.ab_protocol import (
    ABResponse,
    ABStreamDelta,
    ABStreamResult,
    ABStreamStart,
    FirstTokenResponse,
)


class AbliserveError(UserError):
    """Any failure talking to an abliserve server; the message is one line a user can act on."""


class ServerURLError(AbliserveError):
    """The server URL is not an http(s) URL."""


class ServerUnreachableError(AbliserveError):
    """Nothing answered at the server URL (down, wrong port, wrong host)."""


class RequestRejectedError(AbliserveError):
    """The server answered with an error (bad strength, unknown direction, no permission...)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class DirectionInfo:
    name: str
    details: dict[str, Any]  # whatever else the server reports (layers, method, model...)


Messages = str | Sequence[dict[str, str]]


def chat_messages(prompt: Messages, system: str | None = None) -> list[dict[str, str]]:
    """A prompt string (plus optional system prompt) or a message list, as a message list."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(message) for message in prompt]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def ablation_body(strength: float | None, direction: str | None) -> dict[str, Any]:
    """The ``ablation`` request field (docs/API.md); empty when the server default applies."""
    ablation: dict[str, Any] = {}
    if strength is not None:
        ablation["strength"] = strength
    if direction is not None:
        ablation["direction"] = direction
    return {"ablation": ablation} if ablation else {}


def normalise_server_url(url: str) -> str:
    """``http://host:port`` (no trailing ``/`` or ``/v1``), or :class:`ServerURLError`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerURLError(f"server URL {url!r} is not an http(s) URL like {DEFAULT_SERVER}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ServerURLError(f"server URL {url!r} has an invalid port") from None
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


class AbliserveClient:
    """Chat, A/B and first-token calls against one abliserve server.

    ``openai`` is the underlying :class:`openai.OpenAI` client, for anything this helper does not
    wrap; every call here turns transport and HTTP errors into :class:`AbliserveError`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = normalise_server_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # max_retries=0: a refused connection should fail now with one message, not after retries.
        self.openai = openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or "none",
            timeout=timeout,
            max_retries=0,
        )
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._model: str | None = None

    def close(self) -> None:
        self._http.close()
        self.openai.close()

    def __enter__(self) -> AbliserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- OpenAI-compatible endpoints -------------------------------------------------------

    def models(self) -> list[str]:
        return [model.id for model in self._openai_call(self.openai.models.list).data]

    @property
    def model(self) -> str:
        """The served model's id (the first one listed), fetched once."""
        if self._model is None:
            models = self.models()
            if not models:
                raise AbliserveError(f"the server at {self.base_url} serves no model")
            self._model = models[0]
        return self._model

    def chat(
        self,
        messages: Messages,
        *,
        strength: float | None = None,
        direction: str | None = None,
        system: str | None = None,
        **openai_kwargs: Any,
    ) -> ChatCompletion:
        """``chat.completions.create`` with the ablation in the body; ``strength=None`` leaves
        the server default. The response's ``ablation`` field (an extra) says what was applied.
        ``stream=True`` returns the ``openai`` stream."""
        extra_body = {**openai_kwargs.pop("extra_body", {}), **ablation_body(strength, direction)}
        openai_kwargs.setdefault("model", self.model)
        return self._openai_call(
            self.openai.chat.completions.create,
            messages=chat_messages(messages, system),
            extra_body=extra_body,
            **openai_kwargs,
        )

    def directions(self) -> list[DirectionInfo]:
        """The directions the server has loaded (``GET /v1/directions``)."""
        payload = self._request("GET", "/v1/directions")
        return [
            DirectionInfo(name=item["name"], details={k: v for k, v in item.items() if k != "name"})
            for item in payload.get("data", [])
        ]

    def upload_direction(self, name: str, path: str | Path) -> DirectionInfo:
        """Load the artifact at ``path`` into the running server as ``name`` (``POST
        /v1/directions``, an admin key); requests may name it as soon as this returns."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise AbliserveError(f"cannot read direction artifact {path}: {error}") from None
        files = {"file": (Path(path).name, data, "application/octet-stream")}
        item = self._request("POST", "/v1/directions", data={"name": name}, files=files)
        return DirectionInfo(
            name=item["name"], details={k: v for k, v in item.items() if k != "name"}
        )

    def delete_direction(self, name: str) -> int:
        """Remove a direction from the running server (``DELETE /v1/directions/{name}``, an
        admin key); returns how many requests still in flight finish with it."""
        return int(self._request("DELETE", f"/v1/directions/{quote(name, safe='')}")["in_flight"])

    # --- abliserve endpoints ---------------------------------------------------------------

    def ab(
        self,
        prompt: Messages,
        *,
        strengths: Sequence[float] = (1.0,),
        direction: str | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> ABResponse:
        """Run one prompt at baseline and at each strength (same seed) and return all outputs
        with refusal flags, token counts and latencies. ``sampling``: ``max_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``."""
        body = self._ab_body(prompt, strengths, direction, system, sampling)
        return ABResponse.model_validate(self._request("POST", "/v1/ab", json=body))

    def ab_stream(
        self,
        prompt: Messages,
        *,
        strengths: Sequence[float] = (1.0,),
        direction: str | None = None,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[ABStreamStart | ABStreamDelta | ABStreamResult]:
        """Like :meth:`ab`, streamed: a start event, text deltas tagged by variant index as they
        are generated, and each variant's full result as it finishes."""
        body = {**self._ab_body(prompt, strengths, direction, system, sampling), "stream": True}
        parsers = {"start": ABStreamStart, "delta": ABStreamDelta, "result": ABStreamResult}
        with (
            _transport_errors(self.base_url),
            self._http.stream("POST", "/v1/ab", json=body) as response,
        ):
            if response.is_error:
                response.read()
                raise self._rejection(response)
            for event, data in _sse_events(response.iter_lines()):
                if event == "error":
                    raise RequestRejectedError(
                        f"the server failed the A/B request: {data.get('message', data)}", 500
                    )
                if event in parsers:
                    yield parsers[event].model_validate(data)

    def first_token(
        self,
        prompt: Messages,
        *,
        strengths: Sequence[float] = (1.0,),
        direction: str | None = None,
        system: str | None = None,
        top_logprobs: int = 5,
    ) -> FirstTokenResponse:
        """The first generated token's distribution at baseline and each strength, with
        KL(baseline ‖ ablated) over the whole vocabulary computed by the server."""
        body: dict[str, Any] = {
            "messages": chat_messages(prompt, system),
            "strengths": list(strengths),
            "top_logprobs": top_logprobs,
        }
        if direction is not None:
            body["direction"] = direction
        payload = self._request("POST", "/v1/ab/first-token", json=body)
        return FirstTokenResponse.model_validate(payload)

    # --- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _ab_body(
        prompt: Messages,
        strengths: Sequence[float],
        direction: str | None,
        system: str | None,
        sampling: dict[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": chat_messages(prompt, system),
            "strengths": list(strengths),
            **{key: value for key, value in sampling.items() if value is not None},
        }
        if direction is not None:
            body["direction"] = direction
        return body

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        with _transport_errors(self.base_url):
            response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise self._rejection(response)
        return response.json()

    def _rejection(self, response: httpx.Response) -> RequestRejectedError:
        path = response.request.url.path
        if response.status_code in (404, 405) and not _openai_error(response):
            return RequestRejectedError(
                f"{self.base_url} has no {path} endpoint (is it an abliserve server?)",
                response.status_code,
            )
        message, code = _error_message(response)
        return RequestRejectedError(
            f"server rejected {path} ({response.status_code}): {message}",
            response.status_code,
            code,
        )

    def _openai_call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except openai.APIConnectionError as error:
            raise _unreachable(self.base_url, error.__cause__ or error) from None
        except openai.APIStatusError as error:
            raise self._rejection(error.response) from None


@contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    """Turn httpx transport failures into :class:`ServerUnreachableError`."""
    try:
        yield
    except httpx.TransportError as error:
        raise _unreachable(base_url, error) from None


def _unreachable(base_url: str, cause: BaseException) -> ServerUnreachableError:
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, httpx.TimeoutException):
        reason = "timed out"
    return ServerUnreachableError(
        f"cannot reach an abliserve server at {base_url} ({reason}); "
        "is `abliserve serve` running there?"
    )


def _openai_error(response: httpx.Response) -> dict[str, Any] | None:
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    error = _openai_error(response)
    if error is not None:
        return str(error.get("message", error)).splitlines()[0], error.get("code")
    return response.text.strip().splitlines()[0] if response.text.strip() else "no details", None


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event name, decoded JSON data) pairs from a ``text/event-stream`` body."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield event, json.loads("\n".join(data))
