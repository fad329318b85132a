"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI request in, tokens through the
engine, OpenAI response (or server-sent events) out, with what ablation was applied.

Every check that can fail runs before the first byte is sent, so errors are proper 4xx JSON
responses even for streaming requests; failures inside the engine while streaming become an
OpenAI-style ``error`` event (the SDK raises it), followed by ``[DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from abliserve.server.completions import CompletionService, Delta, collect, merge, stop_token_ids
from abliserve.server.engines.base import AblationSpec, EngineError, SamplingOptions, TokenLogprob
from abliserve.server.errors import ApiError, bad_request, error_body
from abliserve.server.policy import (
    APPLIED_HEADER,
    DIRECTION_HEADER,
    STRENGTH_HEADER,
    AblationAsk,
    ApiKeys,
    KeyPolicy,
    ServerPolicy,
    applied_json,
    describe_applied,
    resolve_ablation,
)
from abliserve.server.protocol import (
    LOGIT_BIAS_RANGE,
    AblationApplied,
    AblationBody,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    TopLogprob,
    Usage,
)

router = APIRouter()
Body = TypeVar("Body", bound=BaseModel)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_CHOICES = 64  # prompts x n per completions request: one request must not flood the engine


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
    """Header + body + key → the ablation this request gets (400/403 on bad or forbidden asks)."""
    ask = AblationAsk(
        header_strength=request.headers.get(STRENGTH_HEADER),
        header_direction=request.headers.get(DIRECTION_HEADER),
        body_strength=body.strength if body else None,
        body_direction=body.direction if body else None,
    )
    return resolve_ablation(ask, api_state(request).policy, key_policy(request))


def check_model(state: ApiState, name: str) -> None:
    if name not in state.served_model_names:
        raise ApiError(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )


def sampling_options(
    body: SamplingFields, service: CompletionService, max_tokens: int, logprobs: int | None
) -> SamplingOptions:
    """The request's sampling, every control checked here against the model (token ids in the
    vocabulary, ``min_tokens`` within ``max_tokens``), unset ones at vLLM's defaults."""
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
            "min_tokens",
        )
    eos = () if body.ignore_eos else tuple(stop_token_ids(service.tokenizer))
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop_token_ids=eos + tuple(service.vocab_ids(body.stop_token_ids or [], "stop_token_ids")),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=logit_bias(body.logit_bias or {}, service),
        min_tokens=body.min_tokens,
    )


def logit_bias(raw: dict[str, float], service: CompletionService) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` as token ids in the vocabulary, biases in [-100, 100]."""
    low, high = LOGIT_BIAS_RANGE
    parsed = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
            ) from None
        if not low <= value <= high:
            raise bad_request(f"logit_bias values must lie in [{low}, {high}]", "logit_bias")
        parsed[token] = value
    service.vocab_ids(list(parsed), "logit_bias")
    return parsed


def choice_seed(sampling: SamplingOptions, index: int) -> SamplingOptions:
    """Choice ``index`` of ``n`` draws from its own seed, so the choices differ but reproduce."""
    return sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + index)


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def dump(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, value: float) -> TopLogprob:
        text = token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    content = []
    for item in logprobs:
        text = token_text(tokenizer, item.token_id)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=item.logprob,
                bytes=list(text.encode()),
                top_logprobs=[top(t, v) for t, v in item.top.items()],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens = [token_text(tokenizer, item.token_id) for item in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[item.logprob for item in logprobs],
        top_logprobs=[
            {token_text(tokenizer, t): v for t, v in item.top.items()} for item in logprobs
        ],
        text_offset=offsets,
    )


def streaming_response(events: AsyncIterator[str], ablation: AblationSpec) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={APPLIED_HEADER: describe_applied(ablation)}
    )


async def guarded_events(
    deltas: AsyncIterator[Delta],
    render: Callable[[Delta], str | None],
    tail: Callable[[], list[str]],
) -> AsyncIterator[str]:
    """Render deltas as SSE events; an engine failure becomes an ``error`` event; then the tail
    (usage) and ``[DONE]``."""
    try:
        async with aclosing(deltas):
            async for delta in deltas:
                event = render(delta)
                if event is not None:
                    yield event
    except (EngineError, ApiError) as error:
        yield sse(error_body(error.status, str(error)))
    for event in tail():
        yield event
    yield "data: [DONE]\n\n"


async def read_json(request: Request) -> object:
    """The JSON body, whatever the content type claims (clients vary); malformed JSON is a 400."""
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    state = api_state(request)
    service = state.service
    check_model(state, body.model)
    ablation = resolve_request_ablation(request, body.ablation)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    prompt_ids = service.chat_prompt_ids(
        [{"role": m.role, "content": m.text()} for m in body.messages]
    )
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = service.max_tokens_for(
        prompt_ids, body.max_completion_tokens or body.max_tokens, param
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_options(body, service, max_tokens, logprobs)
    stop = body.stop_strings()
    streams = [
        service.stream(
            prompt_ids, choice_seed(sampling, i), ablation, stop=stop, index=i, endpoint="chat"
        )
        for i in range(body.n)
    ]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    applied = AblationApplied(**applied_json(ablation))
    tokenizer = service.tokenizer

    if body.stream:
        completion_tokens = 0

        def render(delta: Delta) -> str | None:
            nonlocal completion_tokens
            completion_tokens += len(delta.token_ids)
            if not (delta.text or delta.finish_reason or body.logprobs or body.return_token_ids):
                return None
            choice = ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=chat_logprobs(tokenizer, delta.logprobs) if body.logprobs else None,
                finish_reason=delta.finish_reason,
                token_ids=delta.token_ids if body.return_token_ids else None,
            )
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=body.model,
                    choices=[choice],
                    ablation=applied if delta.finish_reason else None,
                )
            )

        def tail() -> list[str]:
            if not (body.stream_options and body.stream_options.include_usage):
                return []
            usage = Usage(
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
                total_tokens=len(prompt_ids) + completion_tokens,
            )
            return [
                sse(
                    ChatCompletionChunk(
                        id=request_id,
                        created=created,
                        model=body.model,
                        choices=[],
                        usage=usage,
                        ablation=applied,
                    )
                )
            ]

        first = ChatCompletionChunk(
            id=request_id,
            created=created,
            model=body.model,
            ablation=applied,
            choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(body.n)
            ],
        )

        async def events() -> AsyncIterator[str]:
            yield sse(first)
            async for event in guarded_events(merge(streams), render, tail):
                yield event

        return streaming_response(events(), ablation)

    outputs = await collect(streams)  # a client that leaves is cancelled by LimitsMiddleware
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    response = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                index=o.index,
                message=AssistantMessage(content=o.text),
                logprobs=chat_logprobs(tokenizer, o.logprobs) if body.logprobs else None,
                finish_reason=o.finish_reason,
                token_ids=o.token_ids if body.return_token_ids else None,
            )
            for o in outputs
        ],
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt_ids) + completion_tokens,
        ),
        ablation=applied,
    )
    result = dump(response)
    result.headers[APPLIED_HEADER] = describe_applied(ablation)
    return result


def completion_prompts(
    prompt: str | list[int] | list[str] | list[list[int]],
) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts (a string or token ids each)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    state = api_state(request)
    service = state.service
    check_model(state, body.model)
    ablation = resolve_request_ablation(request, body.ablation)
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    texts = completion_prompts(body.prompt)
    if len(texts) * body.n > MAX_CHOICES:
        raise bad_request(
            f"{len(texts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices",
            "prompt",
        )
    prompts = [service.text_prompt_ids(p) for p in texts]
    requested = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    budgets = [service.max_tokens_for(ids, requested, "max_tokens", "prompt") for ids in prompts]
    base = sampling_options(body, service, requested, body.logprobs)
    stop = body.stop_strings()
    streams = []
    for p, (ids, budget) in enumerate(zip(prompts, budgets, strict=True)):
        for j in range(body.n):
            sampling = choice_seed(replace(base, max_tokens=budget), j)
            streams.append(
                service.stream(
                    ids, sampling, ablation, stop=stop, index=p * body.n + j, endpoint="completions"
                )
            )
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    applied = AblationApplied(**applied_json(ablation))
    tokenizer = service.tokenizer
    prompt_tokens = sum(len(ids) for ids in prompts)
    want_logprobs = body.logprobs is not None

    if body.stream:
        completion_tokens = 0
        offsets = [0] * len(streams)
        sent_first = False

        def render(delta: Delta) -> str | None:
            nonlocal completion_tokens, sent_first
            completion_tokens += len(delta.token_ids)
            if not (delta.text or delta.finish_reason or want_logprobs or body.return_token_ids):
                return None
            logprobs = None
            if want_logprobs:
                logprobs = completion_logprobs(tokenizer, delta.logprobs, offsets[delta.index])
            offsets[delta.index] += len(delta.text)
            chunk = CompletionResponse(
                id=request_id,
                created=created,
                model=body.model,
                choices=[
                    CompletionChoice(
                        index=delta.index,
                        text=delta.text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        token_ids=delta.token_ids if body.return_token_ids else None,
                    )
                ],
                ablation=applied if (delta.finish_reason or not sent_first) else None,
            )
            sent_first = True
            return sse(chunk)

        def tail() -> list[str]:
            if not (body.stream_options and body.stream_options.include_usage):
                return []
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            return [
                sse(
                    CompletionResponse(
                        id=request_id,
                        created=created,
                        model=body.model,
                        choices=[],
                        usage=usage,
                        ablation=applied,
                    )
                )
            ]

        return streaming_response(guarded_events(merge(streams), render, tail), ablation)

    outputs = await collect(streams)  # a client that leaves is cancelled by LimitsMiddleware
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    response = CompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=o.index,
                text=o.text,
                logprobs=completion_logprobs(tokenizer, o.logprobs, 0) if want_logprobs else None,
                finish_reason=o.finish_reason,
                token_ids=o.token_ids if body.return_token_ids else None,
            )
            for o in outputs
        ],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        ablation=applied,
    )
    result = dump(response)
    result.headers[APPLIED_HEADER] = describe_applied(ablation)
    return result
