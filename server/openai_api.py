"""``POST /v1/chat/completions`` and ``POST /v1/completions`` on the transformers engine.

Each request becomes a :class:`~abliserve.server.completions.Plan` (its prompts, each choice's
sampling, the stop strings, the resolved ablation) and runs on the one request path of
:mod:`abliserve.server.completions`; what differs between the two endpoints is how the plan is
built and the renderer (:class:`ChatRenderer`, :class:`CompletionRenderer`) that shapes the
pieces as the endpoint's OpenAI objects. Failures inside the engine while streaming become an
OpenAI-style ``error`` event (the SDK raises it), followed by ``[DONE]``.
(On the vLLM engine these routes are vLLM's own serving: :mod:`abliserve.server.vllm_surface`.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from abliserve.server.completions import (
    Choice,
    ChoiceOutput,
    CompletionService,
    Delta,
    Plan,
    respond,
    sse,
    stream_response,
)
from abliserve.server.engines.base import AblationSpec, SamplingOptions, TokenLogprob
from abliserve.server.errors import bad_request, error_body
from abliserve.server.policy import applied_json
from abliserve.server.protocol import (
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
    check_choice_count,
    check_model,
    parse_body,
    resolve_request_ablation,
)

router = APIRouter()

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default


# The request fields that are sampling options of the same name and meaning (vLLM's); the
# token budget is checked against the context first.
SAMPLING_CONTROLS = {f.name for f in fields(SamplingOptions)} & set(SamplingFields.model_fields)
SAMPLING_CONTROLS.remove("max_tokens")


def sampling_options(
    body: SamplingFields, service: CompletionService, max_tokens: int, logprobs: int | None
) -> SamplingOptions:
    """The request's sampling controls; unset ones keep vLLM's defaults, and the service checks
    them against the model."""
    controls = body.model_dump(include=SAMPLING_CONTROLS, exclude_none=True)
    return service.sampling(max_tokens, logprobs=logprobs, **controls)


def seeded_choices(
    prompt_ids: list[int], sampling: SamplingOptions, n: int, ablation: AblationSpec
) -> list[Choice]:
    """``n`` choices of one prompt, each drawing from its own seed (when one is set), so the
    choices differ but reproduce."""
    seeds = [None if sampling.seed is None else sampling.seed + i for i in range(n)]
    return [Choice(prompt_ids, replace(sampling, seed=seed), ablation) for seed in seeds]


def chat_plan(
    body: ChatCompletionRequest, service: CompletionService, ablation: AblationSpec
) -> Plan:
    """The chat template applied once; ``n`` choices of it."""
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
    choices = seeded_choices(prompt_ids, sampling, body.n, ablation)
    return Plan("chat", choices, len(prompt_ids), [ablation], body.stop)


def completion_plan(
    body: CompletionRequest, service: CompletionService, ablation: AblationSpec
) -> Plan:
    """``n`` choices per prompt, prompt-major as OpenAI numbers them, each within its context."""
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    texts = completion_prompts(body.prompt)
    check_choice_count(len(texts), body.n)
    prompts = [service.text_prompt_ids(p) for p in texts]
    requested = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    base = sampling_options(body, service, requested, body.logprobs)
    choices = []
    for ids in prompts:
        budget = service.max_tokens_for(ids, requested, "max_tokens", "prompt")
        choices += seeded_choices(ids, replace(base, max_tokens=budget), body.n, ablation)
    prompt_tokens = sum(len(ids) for ids in prompts)
    return Plan("completions", choices, prompt_tokens, [ablation], body.stop)


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


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(item.token_id, item.logprob).model_dump(),
                top_logprobs=[entry(t, v) for t, v in item.top.items()],
            )
            for item in logprobs
        ]
    )


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens = [tokenizer.decode([item.token_id]) for item in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[item.logprob for item in logprobs],
        top_logprobs=[{tokenizer.decode([t]): v for t, v in item.top.items()} for item in logprobs],
        text_offset=offsets,
    )


@dataclass
class OpenAIRenderer:
    """What chat and text completions share: the usage, and the streaming rules (a chunk only
    for a piece that carries something; the applied ablation on the first chunk and on each
    choice's last; an engine failure as OpenAI's ``error`` event; the usage chunk when asked;
    ``[DONE]``). Subclasses shape the endpoint's objects."""

    chunk_type: ClassVar[type[ChatCompletionChunk] | type[CompletionResponse]]

    id: str
    created: int
    model: str
    applied: AblationApplied
    logprobs: bool
    token_ids: bool
    include_usage: bool
    prompt_tokens: int
    tokenizer: object
    choices: int
    sent_ablation: bool = False

    def role_chunk(self) -> BaseModel | None:
        return None

    def chunk(self, delta: Delta, with_ablation: bool) -> BaseModel:
        raise NotImplementedError

    def _object(self, choices: list, **extra) -> BaseModel:
        return self.chunk_type(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    def usage(self, outputs: list[ChoiceOutput]) -> Usage:
        tokens = sum(len(o.token_ids) for o in outputs)
        total = self.prompt_tokens + tokens
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=tokens, total_tokens=total)

    def opening(self) -> list[str]:
        role = self.role_chunk()
        self.sent_ablation = role is not None
        return [] if role is None else [sse(role)]

    def piece(self, delta: Delta, output: ChoiceOutput) -> list[str]:
        if not (delta.text or delta.finish_reason or self.logprobs or self.token_ids):
            return []
        with_ablation = delta.finish_reason is not None or not self.sent_ablation
        self.sent_ablation = True
        return [sse(self.chunk(delta, with_ablation))]

    def ending(self, outputs: list[ChoiceOutput], error: Exception | None) -> list[str]:
        events = [sse(error_body(error.status, str(error)))] if error is not None else []
        if self.include_usage:
            usage = self._object([], usage=self.usage(outputs), ablation=self.applied)
            events.append(sse(usage))
        return [*events, "data: [DONE]\n\n"]


@dataclass
class ChatRenderer(OpenAIRenderer):
    """``chat.completion`` and its chunks (which open with the assistant role)."""

    chunk_type = ChatCompletionChunk

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs | None:
        return chat_logprobs(self.tokenizer, logprobs) if self.logprobs else None

    def role_chunk(self) -> BaseModel:
        """The assistant role for every choice, as OpenAI's first chunk."""
        delta = ChatDelta(role="assistant", content="")
        roles = [ChatChunkChoice(index=i, delta=delta) for i in range(self.choices)]
        return self._object(roles, ablation=self.applied)

    def chunk(self, delta: Delta, with_ablation: bool) -> BaseModel:
        choice = ChatChunkChoice(
            index=delta.index,
            delta=ChatDelta(content=delta.text),
            logprobs=self._logprobs(delta.logprobs),
            finish_reason=delta.finish_reason,
            token_ids=delta.token_ids if self.token_ids else None,
        )
        return self._object([choice], ablation=self.applied if with_ablation else None)

    def whole(self, outputs: list[ChoiceOutput]) -> BaseModel:
        choices = [
            ChatChoice(
                index=o.index,
                message=AssistantMessage(content=o.text),
                logprobs=self._logprobs(o.logprobs),
                finish_reason=o.finish_reason,
                token_ids=o.token_ids if self.token_ids else None,
            )
            for o in outputs
        ]
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(outputs),
            ablation=self.applied,
        )


@dataclass
class CompletionRenderer(OpenAIRenderer):
    """``text_completion`` objects, whole or as chunks (logprob offsets run on per choice)."""

    chunk_type = CompletionResponse
    offsets: dict[int, int] = field(default_factory=dict)  # text offset per streamed choice

    def _choice(self, output: ChoiceOutput | Delta, offset: int) -> CompletionChoice:
        logprobs = output.logprobs
        return CompletionChoice(
            index=output.index,
            text=output.text,
            logprobs=completion_logprobs(self.tokenizer, logprobs, offset)
            if self.logprobs
            else None,
            finish_reason=output.finish_reason,
            token_ids=output.token_ids if self.token_ids else None,
        )

    def chunk(self, delta: Delta, with_ablation: bool) -> BaseModel:
        offset = self.offsets.get(delta.index, 0)
        self.offsets[delta.index] = offset + len(delta.text)
        choice = self._choice(delta, offset)
        return self._object([choice], ablation=self.applied if with_ablation else None)

    def whole(self, outputs: list[ChoiceOutput]) -> BaseModel:
        choices = [self._choice(o, 0) for o in outputs]
        return self._object(choices, usage=self.usage(outputs), ablation=self.applied)


# -- the routes ---------------------------------------------------------------------------------


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
    renderer = endpoint.renderer(
        id=f"{endpoint.id_prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        applied=AblationApplied(**applied_json(ablation)),
        # chat asks with a flag; completions with a count, where 0 still means the chosen token's
        logprobs=body.logprobs if isinstance(body.logprobs, bool) else body.logprobs is not None,
        token_ids=body.return_token_ids,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prompt_tokens=plan.prompt_tokens,
        tokenizer=state.service.tokenizer,
        choices=len(plan.choices),
    )
    if body.stream:
        return stream_response(plan, state.service, renderer)
    return await respond(plan, state.service, renderer)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await serve(request, CHAT)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await serve(request, TEXT)
