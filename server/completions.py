"""The one request path of abliserve's own routes: plan, service, renderer.

A route turns its request and resolved ablation into a :class:`Plan` (one :class:`Choice` of
prompt ids, sampling and ablation per output, the stop strings), and :class:`CompletionService`
checks every fact of it once, while it is built and before the first byte is sent, so errors
are proper 4xx JSON even for streams: the engine still serves, the context length and token
budget, token ids in the vocabulary, the sampling controls. :func:`respond` and
:func:`stream_response` run the plan's choices concurrently and hand the pieces to the route's
renderer, which only shapes the endpoint's objects; the one SSE routine frames them and turns
an engine failure mid-stream into the renderer's ending (an error event).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from abliserve.server.engines.base import (
    AblationSpec,
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)
from abliserve.server.errors import ApiError, bad_request
from abliserve.server.metrics import ServerMetrics, ablation_label
from abliserve.server.policy import APPLIED_HEADER, describe_applied
from abliserve.server.protocol import LOGIT_BIAS_RANGE
from abliserve.server.textstream import TextAssembler


@dataclass
class Delta:
    """New output of one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    distribution: torch.Tensor | None = None  # with ``SamplingOptions.full_distribution``


@dataclass
class ChoiceOutput:
    """One choice, collected, with its timing from the moment the plan started running."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    distribution: torch.Tensor | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # start to first token (None while none came)
    latency_s: float | None = None  # start to the finishing piece

    def add(self, delta: Delta) -> None:
        elapsed = time.perf_counter() - self.started
        if self.first_token_s is None and delta.token_ids:
            self.first_token_s = elapsed
        if delta.finish_reason is not None:
            self.latency_s = elapsed
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.distribution is not None:
            self.distribution = delta.distribution


@dataclass(frozen=True)
class Choice:
    """One output of a request: what the engine runs for it."""

    prompt_ids: list[int]
    sampling: SamplingOptions
    ablation: AblationSpec


@dataclass
class Plan:
    """What one request will run, every fact checked: its choices in output order."""

    endpoint: str  # for metrics: "chat", "completions", "ab", "first_token"
    choices: list[Choice]
    prompt_tokens: int  # each distinct prompt once, as OpenAI's usage counts them
    ablations: list[AblationSpec]  # what the X-Ablation-Applied header reports, in order
    stop: list[str] = field(default_factory=list)


class Renderer(Protocol):
    """Shapes one endpoint's whole answer from its collected choices."""

    def whole(self, outputs: list[ChoiceOutput]) -> BaseModel: ...


class StreamRenderer(Renderer, Protocol):
    """Shapes one endpoint's server-sent events; :func:`stream_response` frames and sends them."""

    def opening(self) -> list[str]: ...
    def piece(self, delta: Delta, output: ChoiceOutput) -> list[str]: ...
    def ending(self, outputs: list[ChoiceOutput], error: Exception | None) -> list[str]: ...


def sse(payload: BaseModel | dict, event: str | None = None) -> str:
    """One server-sent event: ``data: <json>``, named when ``event`` is given."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n" if event is None else f"event: {event}\ndata: {data}\n\n"


class CompletionService:
    """Owns the engine, the tokenizer and the metrics; checks each fact of a plan once."""

    def __init__(self, engine: Engine, tokenizer, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.vocab_limit = len(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)  # chat templates may end turns with it
        self.eos_ids: tuple[int, ...] = (eos,) if isinstance(eos, int) else ()

    # -- prompts and limits -------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied to ``messages``, ready for the assistant's turn."""
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as error:  # templates raise arbitrary errors on odd conversations
            raise bad_request(
                f"the model's chat template rejected these messages: {str(error)[:200]}",
                "messages",
            ) from None
        return list(ids)

    def text_prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return self.vocab_ids(prompt, param)

    def vocab_ids(self, ids: Sequence[int], param: str) -> list[int]:
        """``ids`` if each is a token of this model's vocabulary, else a 400 naming ``param``."""
        if not all(0 <= t < self.vocab_limit for t in ids):
            raise bad_request(f"token ids must lie in [0, {self.vocab_limit})", param)
        return list(ids)

    def max_tokens_for(
        self,
        prompt_ids: list[int],
        requested: int | None,
        param: str = "max_tokens",
        prompt_param: str = "messages",
    ) -> int:
        """Admit one request before any byte is sent: the engine still serves (else 503, also
        for streams), and the context budget holds; unset ``max_tokens`` means 'up to the
        context limit'."""
        if (reason := self.engine.stopped()) is not None:
            raise ApiError(503, reason)
        limit = self.engine.max_model_len
        if not prompt_ids:
            raise bad_request("the prompt is empty", prompt_param)
        if len(prompt_ids) >= limit:
            raise bad_request(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {limit} tokens "
                "and at least one must be left for the completion",
                prompt_param,
                "context_length_exceeded",
            )
        room = limit - len(prompt_ids)
        if requested is None:
            return room
        if requested > room:
            raise bad_request(
                f"max_tokens is {requested} but the prompt ({len(prompt_ids)} tokens) leaves "
                f"room for {room} in this model's {limit}-token context",
                param,
                "context_length_exceeded",
            )
        return requested

    def sampling(
        self,
        max_tokens: int,
        *,
        ignore_eos: bool = False,
        stop_token_ids: Sequence[int] = (),
        logit_bias: Mapping[str, float] | None = None,
        min_tokens: int = 0,
        **controls: Any,
    ) -> SamplingOptions:
        """Sampling for one request, every control checked against the model (token ids in the
        vocabulary, ``min_tokens`` within ``max_tokens``); the end-of-sequence token stops it
        unless ``ignore_eos``. Other ``controls`` are :class:`SamplingOptions` fields."""
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
                "min_tokens",
            )
        stops = self.vocab_ids(stop_token_ids, "stop_token_ids")
        return SamplingOptions(
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=(() if ignore_eos else self.eos_ids) + tuple(stops),
            logit_bias=self.logit_bias(logit_bias or {}),
            min_tokens=min_tokens,
            **controls,
        )

    def logit_bias(self, raw: Mapping[str, float]) -> dict[int, float]:
        """OpenAI's ``{"token id": bias}`` as token ids in the vocabulary, biases in range."""
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
        self.vocab_ids(list(parsed), "logit_bias")
        return parsed

    # -- generation ---------------------------------------------------------------------------

    async def stream(
        self, choice: Choice, stop: Sequence[str], index: int, endpoint: str
    ) -> AsyncIterator[Delta]:
        """Stream one choice. Closing this iterator aborts the engine request."""
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=choice.prompt_ids,
            sampling=choice.sampling,
            ablation=choice.ablation,
        )
        label = ablation_label(choice.ablation.active)
        assembler = TextAssembler(self.tokenizer, list(stop))
        started = time.perf_counter()
        first_token_at: float | None = None
        generated = 0
        finish: str | None = None
        try:
            async with aclosing(checked(self.engine.generate(request))) as chunks:
                async for chunk in chunks:
                    if first_token_at is None and chunk.token_ids:
                        first_token_at = time.perf_counter()
                    generated += len(chunk.token_ids)
                    text = assembler.feed(chunk.token_ids)
                    finish = "stop" if assembler.stopped else chunk.finish_reason
                    if finish is not None:
                        text += assembler.finish()
                    logprobs = chunk.logprobs or []
                    yield Delta(index, text, chunk.token_ids, logprobs, finish, chunk.distribution)
                    if finish is not None:
                        break
        finally:
            if self.metrics is not None:
                self.metrics.record(
                    endpoint,
                    label,
                    [finish or "abort"],
                    len(choice.prompt_ids),
                    generated,
                    started,
                    first_token_at,
                )

    async def run(self, plan: Plan, outputs: list[ChoiceOutput]) -> AsyncIterator[Delta]:
        """Run every choice of ``plan`` concurrently (they share the engine's batches), adding
        each piece to its choice's output as it arrives; closing this aborts them all."""
        streams = [
            self.stream(choice, plan.stop, i, plan.endpoint)
            for i, choice in enumerate(plan.choices)
        ]
        async with aclosing(merge(streams)) as deltas:
            async for delta in deltas:
                outputs[delta.index].add(delta)
                yield delta


def applied_header(plan: Plan) -> dict[str, str]:
    return {APPLIED_HEADER: ", ".join(describe_applied(spec) for spec in plan.ablations)}


async def respond(plan: Plan, service: CompletionService, renderer: Renderer) -> Response:
    """Run ``plan`` to the end and answer with the renderer's whole object. A client that
    leaves is cancelled by the limits middleware, which aborts the engine requests."""
    outputs = [ChoiceOutput(index=i) for i in range(len(plan.choices))]
    async with aclosing(service.run(plan, outputs)) as deltas:
        async for _ in deltas:
            pass
    body = renderer.whole(outputs).model_dump_json()
    return Response(body, media_type="application/json", headers=applied_header(plan))


def stream_response(
    plan: Plan, service: CompletionService, renderer: StreamRenderer
) -> StreamingResponse:
    """Run ``plan`` and send the renderer's events as they come; an engine failure mid-stream
    ends the pieces and goes to the renderer's ending (an error event)."""
    outputs = [ChoiceOutput(index=i) for i in range(len(plan.choices))]

    async def events() -> AsyncIterator[str]:
        for event in renderer.opening():
            yield event
        error = None
        try:
            async with aclosing(service.run(plan, outputs)) as deltas:
                async for delta in deltas:
                    for event in renderer.piece(delta, outputs[delta.index]):
                        yield event
        except (EngineError, ApiError) as failure:
            error = failure
        for event in renderer.ending(outputs, error):
            yield event

    return StreamingResponse(events(), media_type="text/event-stream", headers=applied_header(plan))


async def checked(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """Engines refuse malformed requests with ValueError when they are submitted (the first
    step of the stream); that is the client's fault, so it becomes a 400."""
    async with aclosing(chunks):  # closing us closes the engine stream (and aborts it)
        try:
            first = await anext(chunks)
        except ValueError as error:
            raise bad_request(str(error)) from None
        except StopAsyncIteration:
            return
        yield first
        async for chunk in chunks:
            yield chunk


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Interleave several choices' streams as their pieces arrive; closing this closes them all."""
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[Delta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put(delta)
        except Exception as error:
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
