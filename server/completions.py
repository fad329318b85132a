"""From a tokenized prompt and a resolved ablation to text: the path every endpoint shares.

:class:`CompletionService` owns the engine, the tokenizer and the metrics. It checks lengths
(context overflow and over-long ``max_tokens`` are 400s), streams :class:`Delta` pieces per
choice (UTF-8-safe text, token ids, logprobs, finish reason), aborts the engine request when
a stop string ends it or the consumer goes away, and records metrics.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from abliserve.server.engines.base import (
    AblationSpec,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)
from abliserve.server.errors import ApiError, bad_request
from abliserve.server.metrics import ServerMetrics, ablation_label
from abliserve.server.textstream import TextAssembler


@dataclass
class Delta:
    """New output of one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None


@dataclass
class ChoiceOutput:
    """One choice, collected."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason


class CompletionService:
    def __init__(self, engine: Engine, tokenizer, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.vocab_limit = len(tokenizer)

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

    def vocab_ids(self, ids: list[int], param: str) -> list[int]:
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

    # -- generation ---------------------------------------------------------------------------

    async def stream(
        self,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        ablation: AblationSpec,
        *,
        stop: Sequence[str] = (),
        index: int = 0,
        endpoint: str = "internal",
    ) -> AsyncIterator[Delta]:
        """Stream one choice. Closing this iterator aborts the engine request."""
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            ablation=ablation,
        )
        label = ablation_label(ablation.active)
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
                    yield Delta(index, text, chunk.token_ids, chunk.logprobs or [], finish)
                    if finish is not None:
                        break
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(endpoint, label, finish or "abort").inc()
                self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids))
                self.metrics.generation_tokens.labels(label).inc(generated)
                self.metrics.latency.labels(label).observe(time.perf_counter() - started)
                if first_token_at is not None:
                    self.metrics.first_token.labels(label).observe(first_token_at - started)


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


async def collect(streams: list[AsyncIterator[Delta]]) -> list[ChoiceOutput]:
    outputs = [ChoiceOutput(index=i) for i in range(len(streams))]
    async with aclosing(merge(streams)) as deltas:
        async for delta in deltas:
            outputs[delta.index].add(delta)
    return outputs


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's end-of-sequence token (chat templates may end turns with it)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else []
