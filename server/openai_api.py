"""``POST /v1/chat/completions`` and ``POST /v1/completions`` on the transformers engine: one
request path for both.

A request becomes a :class:`Plan` (its prompts, each choice's sampling, the stop strings and the
resolved ablation; every fact checked once, before the first byte, so errors are proper 4xx JSON
even for streams). :func:`respond` runs the plan through the :class:`CompletionService` and a
renderer (:class:`ChatRenderer` or :class:`CompletionRenderer`) shapes the pieces as the
endpoint's OpenAI objects; one SSE routine serves both. Failures inside the engine while
streaming become an OpenAI-style ``error`` event (the SDK raises it), followed by ``[DONE]``.
(On the vLLM engine these routes are vLLM's own serving: :mod:`abliserve.server.vllm_surface`.)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from abliserve.server.completions import (
    ChoiceOutput,
    CompletionService,
    Delta,
    collect,
    merge,
    stop_token_ids,
)
from abliserve.server.engines.base import AblationSpec, EngineError, SamplingOptions, TokenLogprob
from abliserve.server.errors import ApiError, bad_request, error_body
from abliserve.server.policy import APPLIED_HEADER, applied_json, describe_applied
from abliserve.server.protocol import (
    LOGIT_BIAS_RANGE,
    MAX_CHOICES,
    AblationApplied,
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
from abliserve.server.request_intake import (
    api_state,
    check_model,
    parse_body,
    resolve_request_ablation,
)

router = APIRouter()

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default


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


# -- the plan: one request, checked -----------------------------------------------------------


@dataclass
class Plan:
    """What one request will run: a (prompt ids, sampling) pair per choice, in choice order."""

    endpoint: str  # "chat" or "completions", for metrics
    choices: list[tuple[list[int], SamplingOptions]]
    prompt_tokens: int  # each distinct prompt once, as OpenAI's usage counts them
    stop: list[str]
    ablation: AblationSpec


def chat_plan(
    body: ChatCompletionRequest, service: CompletionService, ablation: AblationSpec
) -> Plan:
    """The chat template applied once; ``n`` choices of it, each with its own seed."""
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
    choices = [(prompt_ids, choice_seed(sampling, i)) for i in range(body.n)]
    return Plan("chat", choices, len(prompt_ids), body.stop_strings(), ablation)


def completion_plan(
    body: CompletionRequest, service: CompletionService, ablation: AblationSpec
) -> Plan:
    """``n`` choices per prompt, prompt-major as OpenAI numbers them, each within its context."""
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
    base = sampling_options(body, service, requested, body.logprobs)
    choices = []
    for ids in prompts:
        budget = service.max_tokens_for(ids, requested, "max_tokens", "prompt")
        sampling = replace(base, max_tokens=budget)
        choices += [(ids, choice_seed(sampling, j)) for j in range(body.n)]
    prompt_tokens = sum(len(ids) for ids in prompts)
    return Plan("completions", choices, prompt_tokens, body.stop_strings(), ablation)


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


# -- renderers: the endpoint's OpenAI objects ---------------------------------------------------


@dataclass
class Meta:
    """What every object of one response carries."""

    id: str
    created: int
    model: str
    applied: AblationApplied
    logprobs: bool
    token_ids: bool


class Renderer(Protocol):
    """Shapes one endpoint's OpenAI objects; :func:`respond` and :func:`sse_events` do the rest."""

    meta: Meta

    def opening(self, n: int) -> BaseModel | None: ...
    def piece(self, delta: Delta, with_ablation: bool) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def whole(self, outputs: list[ChoiceOutput], usage: Usage) -> BaseModel: ...


@dataclass
class ChatRenderer:
    """``chat.completion`` and its chunks (which open with the assistant role)."""

    meta: Meta
    tokenizer: object

    def _chunk(self, choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
        m = self.meta
        return ChatCompletionChunk(
            id=m.id, created=m.created, model=m.model, choices=choices, **extra
        )

    def opening(self, n: int) -> BaseModel:
        """The assistant role for every choice, as OpenAI's first chunk."""
        roles = [
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            for i in range(n)
        ]
        return self._chunk(roles, ablation=self.meta.applied)

    def piece(self, delta: Delta, with_ablation: bool) -> BaseModel:
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=delta.text),
            logprobs=chat_logprobs(self.tokenizer, delta.logprobs) if self.meta.logprobs else None,
            finish_reason=delta.finish_reason,
            token_ids=delta.token_ids if self.meta.token_ids else None,
        )
        return self._chunk([choice], ablation=self.meta.applied if with_ablation else None)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage=usage, ablation=self.meta.applied)

    def whole(self, outputs: list[ChoiceOutput], usage: Usage) -> BaseModel:
        m = self.meta
        choices = [
            ChatChoice(
                index=o.index,
                message=AssistantMessage(content=o.text),
                logprobs=chat_logprobs(self.tokenizer, o.logprobs) if m.logprobs else None,
                finish_reason=o.finish_reason,
                token_ids=o.token_ids if m.token_ids else None,
            )
            for o in outputs
        ]
        return ChatCompletionResponse(
            id=m.id,
            created=m.created,
            model=m.model,
            choices=choices,
            usage=usage,
            ablation=m.applied,
        )


@dataclass
class CompletionRenderer:
    """``text_completion`` objects, whole or as chunks (logprob offsets run on per choice)."""

    meta: Meta
    tokenizer: object
    offsets: dict[int, int] = field(default_factory=dict)  # text offset per streamed choice

    def _object(self, choices: list[CompletionChoice], **extra) -> CompletionResponse:
        m = self.meta
        return CompletionResponse(
            id=m.id, created=m.created, model=m.model, choices=choices, **extra
        )

    def _choice(self, index, text, logprobs, finish, token_ids, offset) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=completion_logprobs(self.tokenizer, logprobs, offset)
            if self.meta.logprobs
            else None,
            finish_reason=finish,
            token_ids=token_ids if self.meta.token_ids else None,
        )

    def opening(self, n: int) -> None:
        return None  # text completions have no role chunk

    def piece(self, delta: Delta, with_ablation: bool) -> BaseModel:
        offset = self.offsets.get(delta.index, 0)
        self.offsets[delta.index] = offset + len(delta.text)
        choice = self._choice(
            delta.index, delta.text, delta.logprobs, delta.finish_reason, delta.token_ids, offset
        )
        return self._object([choice], ablation=self.meta.applied if with_ablation else None)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._object([], usage=usage, ablation=self.meta.applied)

    def whole(self, outputs: list[ChoiceOutput], usage: Usage) -> BaseModel:
        choices = [
            self._choice(o.index, o.text, o.logprobs, o.finish_reason, o.token_ids, 0)
            for o in outputs
        ]
        return self._object(choices, usage=usage, ablation=self.meta.applied)


# -- one request path --------------------------------------------------------------------------


def usage(plan: Plan, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=plan.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=plan.prompt_tokens + completion_tokens,
    )


async def respond(
    plan: Plan, service: CompletionService, renderer: Renderer, stream: bool, include_usage: bool
) -> Response:
    """Run ``plan`` and answer: the whole response, or its pieces as server-sent events."""
    streams = [
        service.stream(
            ids, sampling, plan.ablation, stop=plan.stop, index=i, endpoint=plan.endpoint
        )
        for i, (ids, sampling) in enumerate(plan.choices)
    ]
    header = {APPLIED_HEADER: describe_applied(plan.ablation)}
    if stream:
        events = sse_events(plan, renderer, streams, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=header)
    # A client that leaves is cancelled by LimitsMiddleware, which aborts the engine requests.
    outputs = await collect(streams)
    tokens = sum(len(o.token_ids) for o in outputs)
    whole = renderer.whole(outputs, usage(plan, tokens))
    return JSONResponse(whole.model_dump(mode="json"), headers=header)


async def sse_events(
    plan: Plan, renderer: Renderer, streams: list, include_usage: bool
) -> AsyncIterator[str]:
    """The stream: an opening chunk where the endpoint has one, a chunk per piece (the applied
    ablation on the first chunk and on each choice's last), the usage chunk if asked, [DONE]."""
    meta = renderer.meta
    opening = renderer.opening(len(plan.choices))
    if opening is not None:
        yield sse(opening)
    sent_ablation = opening is not None
    completion_tokens = 0

    def render(delta: Delta) -> str | None:
        nonlocal completion_tokens, sent_ablation
        completion_tokens += len(delta.token_ids)
        if not (delta.text or delta.finish_reason or meta.logprobs or meta.token_ids):
            return None
        with_ablation = delta.finish_reason is not None or not sent_ablation
        sent_ablation = True
        return sse(renderer.piece(delta, with_ablation))

    def tail() -> list[str]:
        return [sse(renderer.usage_chunk(usage(plan, completion_tokens)))] if include_usage else []

    async for event in guarded_events(merge(streams), render, tail):
        yield event


@dataclass(frozen=True)
class Endpoint:
    """What differs between chat and text completions; everything else is one path."""

    request: type[ChatCompletionRequest] | type[CompletionRequest]
    plan: Callable[..., Plan]
    id_prefix: str
    renderer: type[ChatRenderer] | type[CompletionRenderer]


CHAT = Endpoint(ChatCompletionRequest, chat_plan, "chatcmpl", ChatRenderer)
TEXT = Endpoint(CompletionRequest, completion_plan, "cmpl", CompletionRenderer)


async def serve(request: Request, endpoint: Endpoint) -> Response:
    """Body → model check → ablation (key policy) → plan → response."""
    body = await parse_body(request, endpoint.request)
    state = api_state(request)
    check_model(state, body.model)
    ablation = resolve_request_ablation(request, body.ablation)
    plan = endpoint.plan(body, state.service, ablation)
    meta = Meta(
        id=f"{endpoint.id_prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        applied=AblationApplied(**applied_json(ablation)),
        logprobs=wants_logprobs(body),
        token_ids=body.return_token_ids,
    )
    renderer = endpoint.renderer(meta, state.service.tokenizer)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(plan, state.service, renderer, body.stream, include_usage)


def wants_logprobs(body: ChatCompletionRequest | CompletionRequest) -> bool:
    """Chat asks with a flag; completions with a count, where 0 still means the chosen token's."""
    return body.logprobs if isinstance(body.logprobs, bool) else body.logprobs is not None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await serve(request, CHAT)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await serve(request, TEXT)
