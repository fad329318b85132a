"""Where every generation request comes in: the app's shared state, the JSON body, the caller's
key policy and the ablation the request gets. Shared by the OpenAI routes (either engine) and the
A/B routes, so each of these facts is established in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from abliserve.server.completions import CompletionService
from abliserve.server.engines.base import AblationSpec
from abliserve.server.errors import ApiError, bad_request, shown
from abliserve.server.policy import (
    DIRECTION_HEADER,
    STRENGTH_HEADER,
    AblationAsk,
    ApiKeys,
    KeyPolicy,
    ServerPolicy,
    resolve_ablation,
)
from abliserve.server.protocol import MAX_CHOICES, AblationBody

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ApiState:
    """What the routes need; built by the app's lifespan and kept on ``app.state.api``."""

    service: CompletionService
    policy: ServerPolicy
    keys: ApiKeys
    served_model_names: list[str]


def api_state(request: Request) -> ApiState:
    return request.app.state.api


def key_policy(request: Request) -> KeyPolicy:
    """The caller's key policy, checked by the app's middleware before the body was read."""
    return request.state.key_policy


def resolve_request_ablation(request: Request, body: AblationBody | None) -> AblationSpec:
    """Header + body + key → the ablation this request gets (400/403 on bad or forbidden asks);
    the one place every generating route resolves and authorises an ablation."""
    ask = AblationAsk(
        header_strength=request.headers.get(STRENGTH_HEADER),
        header_direction=request.headers.get(DIRECTION_HEADER),
        body_strength=body.strength if body else None,
        body_direction=body.direction if body else None,
    )
    return resolve_ablation(ask, api_state(request).policy, key_policy(request))


def check_choice_count(prompts: int, n: int) -> None:
    """One request's choices (prompts x n) are bounded on both engines: one request must not
    flood the engine for everyone else."""
    if prompts * n > MAX_CHOICES:
        raise bad_request(
            f"{prompts} prompts x n={n} asks for more than {MAX_CHOICES} choices", "prompt"
        )


def check_model(state: ApiState, name: str) -> None:
    if name not in state.served_model_names:
        raise ApiError(
            404, f"The model {shown(name)} does not exist.", param="model", code="model_not_found"
        )


async def read_json(request: Request) -> object:
    """The JSON body (the guard middleware has checked it is declared JSON); malformed JSON and
    JSON nested too deeply for the parser are 400s."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as ``model``; invalid fields are 400s naming the field."""
    data = await read_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


def validation_error(error: ValidationError, prefix: str | None = None) -> ApiError:
    """Pydantic's first complaint as an OpenAI error naming the offending field (under
    ``prefix`` when a nested object was validated on its own)."""
    first = error.errors()[0]
    parts = [prefix] if prefix else []
    param = ".".join([*parts, *(str(part) for part in first["loc"])]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":  # never accepted and ignored: say so
        message = "not supported on this engine (the vLLM engine serves vLLM's whole API)"
    return bad_request(f"{param}: {message}" if param else message, param)
