"""vLLM's own OpenAI chat and completions serving, in process, with the ablation in front.

On the vLLM engine, ``POST /v1/chat/completions`` and ``POST /v1/completions`` are answered by
vLLM's ``OpenAIServingChat`` and ``OpenAIServingCompletion``, built over the engine's
``AsyncLLM`` by vLLM's own ``init_app_state`` from vLLM's own argument parser, exactly as
``vllm serve`` builds them. Every field ``vllm serve`` honours (tools, ``response_format``,
``logit_bias``, penalties, ``top_k``, ``min_p``, ``min_tokens``, ``echo``, ...) therefore works,
and fails, the same here: nothing is accepted and quietly dropped. abliserve adds, per request:

* the key policy and the ablation the request asked for (headers or the body's ``ablation``),
  resolved as on every other route, before vLLM sees the request;
* the ablation, carried in ``vllm_xargs`` (vLLM copies it into ``SamplingParams.extra_args``,
  where the worker plugin reads it) and, for ablated requests, a prefix-cache salt;
* a 400 for a field vLLM's request models do not name (``vllm serve`` logs and drops it);
* the answer's ``ablation`` field (non-streamed body; first and last stream chunk) and the
  ``X-Ablation-Applied`` header.

The engine lifts vLLM's logprob cap for the first-token KL route, so the client-facing cap that
``vllm serve`` would apply (20) is applied here instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from abliserve.server.engines.base import AblationSpec, HeldSlot
from abliserve.server.engines.vllm_engine import VllmEngine
from abliserve.server.engines.vllm_routing import EXTRA_ARGS_KEY, ablation_extra_args
from abliserve.server.errors import ApiError, bad_request
from abliserve.server.metrics import ServerMetrics, ablation_label
from abliserve.server.policy import APPLIED_HEADER, applied_json, describe_applied
from abliserve.server.protocol import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    AblationBody,
    check_stop,
)
from abliserve.server.request_intake import (
    api_state,
    check_choice_count,
    read_json,
    resolve_request_ablation,
    validation_error,
)

router = APIRouter()

LOGPROB_FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs")


@dataclass
class VllmSurface:
    """vLLM's serving objects for chat and text completions, and the engine they run on."""

    engine: VllmEngine
    chat: Any  # vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat
    completion: Any  # vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion


async def build_surface(
    engine: VllmEngine, served_model_names: list[str], tool_call_parser: str | None = None
) -> VllmSurface:
    """Build vLLM's chat and completions serving over the started ``engine``, with ``vllm
    serve``'s defaults for everything not named here (``tool_call_parser`` as ``vllm serve
    --enable-auto-tool-choice --tool-call-parser``)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(engine.checkpoint), "--served-model-name", *served_model_names]
    if tool_call_parser is not None:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    state = State()
    client = engine.client
    await init_app_state(client, state, args, tuple(await client.get_supported_tasks()))
    return VllmSurface(engine, state.openai_serving_chat, state.openai_serving_completion)


def surface(request: Request) -> VllmSurface:
    return request.app.state.vllm_surface


def split_ablation(data: Any) -> tuple[dict, AblationBody | None]:
    """The request body without abliserve's ``ablation`` extension, and that extension."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    rest = dict(data)
    raw = rest.pop("ablation", None)
    if raw is None:
        return rest, None
    try:
        return rest, AblationBody.model_validate(raw)
    except ValidationError as error:
        raise validation_error(error, prefix="ablation") from None


def check_bounds(body: BaseModel, choices: int) -> None:
    """The per-request caps ``vllm serve`` would apply with its default ``max_logprobs`` (20),
    and abliserve's caps on stop strings and on choices per request."""
    for name in LOGPROB_FIELDS:
        value = getattr(body, name, None)
        counted = isinstance(value, int) and not isinstance(value, bool)  # chat's logprobs: bool
        if counted and not 0 <= value <= MAX_TOP_LOGPROBS:
            raise bad_request(f"{name} must lie in [0, {MAX_TOP_LOGPROBS}]", name)
    try:  # the transformers engine's stop-list bounds: vLLM searches every stop string per token
        check_stop(getattr(body, "stop", None))
    except ValueError as error:
        raise bad_request(str(error), "stop") from None
    n = getattr(body, "n", 1) or 1
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must lie in [1, {MAX_N}]", "n")
    check_choice_count(choices, n)


def carry_ablation(body: Any, ablation: AblationSpec, held: HeldSlot) -> None:
    """Put ``ablation`` on a validated vLLM request: the worker's route (the bank slot ``held``
    by the caller) in ``vllm_xargs`` (any client-sent value under abliserve's key is replaced,
    so the key policy cannot be bypassed) and, for ablated requests, the prefix-cache salt
    (joined with the client's own salt)."""
    xargs = {k: v for k, v in (body.vllm_xargs or {}).items() if k != EXTRA_ARGS_KEY}
    xargs.update(ablation_extra_args(held.slot, ablation.strength) or {})
    body.vllm_xargs = xargs or None
    salt = held.cache_salt
    if salt is not None:
        body.cache_salt = salt if body.cache_salt is None else f"{salt}:{body.cache_salt}"


async def serve(request: Request, endpoint: str) -> Response:
    """One chat or completions request through vLLM's serving, ablation resolved in front."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMError

    data, asked = split_ablation(await read_json(request))
    ablation = resolve_request_ablation(request, asked)
    target = surface(request)
    if (reason := target.engine.stopped()) is not None:
        raise ApiError(503, reason)
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    try:
        body = model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None
    if body.model_extra:  # vLLM would log and drop these; abliserve never drops a field
        name = sorted(body.model_extra)[0]
        raise bad_request(f"{name}: not a field of vLLM's {endpoint} API", name)
    prompts = getattr(body, "prompt", None)  # completions: one prompt or a batch of them
    batched = isinstance(prompts, list) and prompts and not isinstance(prompts[0], int)
    check_bounds(body, len(prompts) if batched else 1)
    # The direction's bank slot is held until the answer's last byte (a stream's included), so
    # a direction removed meanwhile never has its slot rewritten under this request.
    hold = ExitStack()
    carry_ablation(body, ablation, hold.enter_context(target.engine.holding(ablation)))
    serving = target.chat if endpoint == "chat" else target.completion
    create = serving.create_chat_completion if endpoint == "chat" else serving.create_completion
    record = Recorder(api_state(request).service.metrics, endpoint, ablation)
    try:
        try:
            result = await create(body, request)
        except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as error:
            result = create_error_response(error)  # as ``vllm serve``'s exception handlers do
        response = render(result, ablation, record, hold.pop_all())
    finally:
        hold.close()
    return response


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await serve(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await serve(request, "completions")


def render(result: Any, ablation: AblationSpec, record: Recorder, hold: ExitStack) -> Response:
    """vLLM's answer with what was applied: an error as vLLM shaped it, a response with the
    ``ablation`` field, a stream with it on the first and last chunk; the header on both.
    ``hold`` (the bank slot) is released now, or when a stream ends."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        hold.close()
        record.error(result.error.code)
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    headers = {APPLIED_HEADER: describe_applied(ablation)}
    applied = applied_json(ablation)
    if isinstance(result, BaseModel):
        hold.close()
        payload = result.model_dump(mode="json")
        record.tally(payload)
        record.finished()
        payload["ablation"] = applied
        return JSONResponse(payload, headers=headers)
    return StreamingResponse(
        annotated(result, applied, record, hold), media_type="text/event-stream", headers=headers
    )


async def annotated(
    events: AsyncIterator[str], applied: dict, record: Recorder, hold: ExitStack
) -> AsyncIterator[str]:
    """vLLM's SSE events, with ``ablation`` added to the first chunk and the last one before
    ``[DONE]`` (each event is ``data: <json>``; the last is held until the next arrives)."""
    held: dict | None = None
    first = True
    try:
        async with aclosing(events):  # a client that leaves closes vLLM's stream (an abort)
            async for event in events:
                text = event.strip()
                if not text.startswith("data: {"):  # [DONE], keep-alives
                    if held is not None:
                        yield chunk_event(held, applied)
                        held = None
                    yield event
                    continue
                chunk = json.loads(text[len("data: ") :])
                record.chunk(chunk)
                if "choices" not in chunk:  # an error event
                    yield event
                    continue
                if held is not None:
                    yield chunk_event(held, None)
                if first:
                    first = False
                    yield chunk_event(chunk, applied)
                else:
                    held = chunk
        if held is not None:
            yield chunk_event(held, applied)
    finally:
        hold.close()
        record.finished()


def chunk_event(chunk: dict, applied: dict | None) -> str:
    if applied is not None:
        chunk = {**chunk, "ablation": applied}
    return f"data: {json.dumps(chunk)}\n\n"


class Recorder:
    """abliserve's per-ablation metrics for one request vLLM served (vLLM keeps its own)."""

    def __init__(
        self, metrics: ServerMetrics | None, endpoint: str, ablation: AblationSpec
    ) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.label = ablation_label(ablation.active)
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish_reasons: list[str] = []
        self.usage: dict | None = None

    def chunk(self, chunk: dict) -> None:
        """One stream chunk: the first with choices marks the first token."""
        if self.first_token_at is None and chunk.get("choices"):
            self.first_token_at = time.perf_counter()
        self.tally(chunk)

    def tally(self, payload: dict) -> None:
        for choice in payload.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reasons.append(choice["finish_reason"])
        self.usage = payload.get("usage") or self.usage

    def error(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(str(status)).inc()

    def finished(self) -> None:
        if self.metrics is None:
            return
        usage = self.usage or {}
        self.metrics.record(
            self.endpoint,
            self.label,
            self.finish_reasons or ["abort"],
            usage.get("prompt_tokens") or 0,
            usage.get("completion_tokens") or 0,
            self.started,
            self.first_token_at,
        )
