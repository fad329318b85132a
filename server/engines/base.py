"""The engine interface: token ids in, token ids out, per-request ablation.

Engines know nothing of HTTP, chat templates or stop strings (the HTTP layer owns those, as in
nanochat); they batch concurrent requests, apply each request's (direction, strength) to its own
rows only, stream new tokens, and abort a request whose client went away.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.server.engines.direction_slots import (
    DEFAULT_MAX_DIRECTIONS,
    DirectionSlots,
    check_direction_name,
)


@dataclass(frozen=True)
class AblationSpec:
    """What to remove from one request: a named direction at a strength (0 = baseline)."""

    direction: str | None
    strength: float

    @property
    def active(self) -> bool:
        return self.strength != 0.0 and self.direction is not None

    def cache_salt(self, load: int = 0) -> str | None:
        """Prefix-cache salt: ablated K/V must never be shared with other (direction, strength)
        pairs, nor with an earlier direction loaded under the same name (``load`` tells the
        loads apart); baseline traffic returns None so it keeps sharing the cache."""
        if not self.active:
            return None
        key = f"abliserve:{self.direction}:{self.strength!r}:{load}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]


BASELINE = AblationSpec(direction=None, strength=0.0)


@dataclass(frozen=True)
class HeldSlot:
    """What a request holds while it runs: its direction's bank slot (0 for the baseline) and
    the prefix-cache salt of its ablation."""

    slot: int
    cache_salt: str | None


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling; temperature 0 is greedy. The controls mean what vLLM's
    ``SamplingParams`` of the same names mean (the transformers engine follows vLLM's order)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # number of top alternatives to report per token, if any
    ignore_eos: bool = False
    # Also return each token's whole (untempered) log-probability vector as one tensor: the
    # first-token KL needs the full vocabulary, and a tensor costs a copy where a
    # {token: logprob} dict of 150k entries costs ~13 MiB of Python objects.
    full_distribution: bool = False
    top_k: int = 0  # 0 (or -1): all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0  # end and stop tokens are masked until this many tokens exist


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    ablation: AblationSpec = BASELINE


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob


@dataclass
class GenerationChunk:
    """New tokens for one request since the previous chunk; ``finish_reason`` on the last one
    ("stop" at an end/stop token, "length" at max_tokens, "abort" when cancelled)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    distribution: torch.Tensor | None = None  # [vocab] log-probs, with full_distribution


class EngineError(RuntimeError):
    """A failure inside the engine while serving one request (reported as HTTP 500)."""

    status = 500


class EngineStoppedError(EngineError):
    """The engine can serve nothing more (e.g. a vLLM worker process died): HTTP 503 for this
    and every later request, and ``/health`` answers 503 too, so a supervisor restarts it."""

    status = 503


class Engine(abc.ABC):
    """One model, several named directions, many concurrent requests.

    The direction bank is allocated at ``max_directions`` slots when the engine starts;
    :meth:`add_direction` and :meth:`remove_direction` change which names map to which slots
    while it serves, writing values in place (never a new tensor), so nothing recompiles and
    no request in flight sees a change (docs/ENGINES.md, "Loading directions while serving").
    """

    name: str

    def __init__(
        self,
        identity: ModelIdentity,
        directions: dict[str, DirectionArtifact],
        max_directions: int = DEFAULT_MAX_DIRECTIONS,
    ) -> None:
        for direction_name, artifact in directions.items():
            artifact.check_fits(identity, artifact_name=f"direction {direction_name!r}")
        self.identity = identity
        self.directions = dict(directions)  # the published directions, by name
        self.max_directions = max_directions
        self.direction_slots = DirectionSlots(directions, max_directions)
        self._bank_lock = asyncio.Lock()  # one load or removal at a time

    async def add_direction(self, name: str, artifact: DirectionArtifact) -> None:
        """Load ``artifact`` under ``name`` while serving: checked as at start-up, copied into a
        free slot (never one a request in flight still holds), then published."""
        check_direction_name(name)
        artifact.check_fits(self.identity, artifact_name=f"direction {name!r}")
        async with self._bank_lock:
            slot = self.direction_slots.reserve(name)
            try:
                await self._write_slot(slot, artifact)
            except BaseException:
                self.direction_slots.unreserve(slot)
                raise
            self.direction_slots.publish(name, slot)
            self.directions[name] = artifact

    async def remove_direction(self, name: str) -> None:
        """Unpublish ``name`` now (new requests get "unknown direction"); requests admitted with
        it finish with it, and its slot is reused only after the last of them."""
        async with self._bank_lock:
            self.direction_slots.unpublish(name)
            del self.directions[name]

    @abc.abstractmethod
    async def _write_slot(self, slot: int, artifact: DirectionArtifact) -> None:
        """Copy ``artifact`` into bank slot ``slot`` in place, wherever the bank lives."""

    @contextmanager
    def holding(self, ablation: AblationSpec) -> Iterator[HeldSlot]:
        """The bank slot a request with ``ablation`` reads, held from admission until the block
        ends; an unknown direction is a ValueError (400 upstream)."""
        name = ablation.direction if ablation.active else None
        if name is not None and name not in self.directions:
            raise ValueError(f"unknown direction {name!r}")
        with self.direction_slots.hold(name) as slot:
            yield HeldSlot(slot, ablation.cache_salt(self.direction_slots.load_number(slot)))

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus completion tokens one request may use."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load and warm up; called once from the server's lifespan."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Abort what is in flight and release the model."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream chunks for one request. Cancelling the consumer aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot (idempotent)."""

    def check_request(self, request: GenerationRequest, vocab_size: int) -> None:
        """Reject (ValueError, a 400 upstream) what would break a batch for everyone in it; the
        HTTP layer checks the same facts first, naming the fields, so this guards other
        callers of the engine."""
        ids, sampling, ablation = request.prompt_token_ids, request.sampling, request.ablation
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
        if sampling.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds the maximum model length {self.max_model_len}"
            )
        if ablation.direction is not None and ablation.direction not in self.directions:
            raise ValueError(f"unknown direction {ablation.direction!r}")
        if not math.isfinite(ablation.strength):
            raise ValueError(f"ablation strength must be finite, got {ablation.strength}")

    def stopped(self) -> str | None:
        """Why the engine can serve no more requests, or None while it can (``/health``)."""
        return None

    def stats(self) -> dict[str, float]:
        """Engine gauges for /metrics (running and waiting requests)."""
        return {}
