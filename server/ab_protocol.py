"""Wire format of the A/B and first-token endpoints, shared by the server and the Python client.

One home for these shapes: the server validates requests and builds responses with them, the
client (:mod:`abliserve.clients.client`) parses responses with them, so the two cannot drift.
Chat messages and sampling fields mirror OpenAI's chat completion request.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from abliserve.server.protocol import SEED_MAX, SEED_MIN, AblationApplied, StopStrings

MAX_VARIANTS = 8  # ablated variants per A/B request, besides the baseline


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class VariantsRequest(BaseModel):
    """What the A/B and first-token requests share: a chat prompt and the variants to ask."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    strengths: list[FiniteFloat] = Field(default=[1.0], min_length=1, max_length=MAX_VARIANTS)
    direction: str | None = None
    model: str | None = None


class ABRequest(VariantsRequest):
    """One chat request, run at baseline (strength 0) and at each of ``strengths``."""

    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=SEED_MIN, le=SEED_MAX)  # the same for every variant
    stop: StopStrings = None
    stream: bool = False


class RefusalFlags(BaseModel):
    """Refusal under one marker list (docs/EVAL.md); ``markers`` are the matched substrings,
    ``[""]`` for an empty output (which counts as a refusal)."""

    refused: bool
    markers: list[str]


class ABVariant(BaseModel):
    label: str  # "baseline" or "strength 0.5"
    ablation: AblationApplied
    text: str
    token_ids: list[int]  # generated tokens, for exact comparisons
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # request start to last token
    first_token_s: float | None  # request start to first token (None when nothing came)
    refusal: dict[str, RefusalFlags]  # marker list name -> flags


class ABResponse(BaseModel):
    id: str
    object: Literal["ab.comparison"] = "ab.comparison"
    model: str
    seed: int
    variants: list[ABVariant]  # baseline first, then one per requested strength, in order


class ABStreamStart(BaseModel):
    """First SSE event of a streaming A/B request: which variants are coming."""

    id: str
    model: str
    variants: list[AblationApplied]


class ABStreamDelta(BaseModel):
    """New text of one variant (an index into the start event's ``variants``)."""

    variant: int
    text: str


class ABStreamResult(BaseModel):
    """One variant finished: its full result (the same object the non-streaming reply holds)."""

    variant: int
    result: ABVariant


class FirstTokenRequest(VariantsRequest):
    """One chat prompt; the first-token distribution at baseline and at each strength."""

    top_logprobs: int = Field(default=5, ge=0, le=100)  # shown for inspection, not used for KL


class TokenProbability(BaseModel):
    token: str
    token_id: int
    logprob: float


class FirstTokenVariant(BaseModel):
    ablation: AblationApplied
    kl_from_baseline: float  # KL(baseline ‖ this variant) over the whole vocabulary, in nats
    top: list[TokenProbability]


class FirstTokenResponse(BaseModel):
    id: str
    object: Literal["first_token.distribution"] = "first_token.distribution"
    model: str
    prompt_tokens: int
    variants: list[FirstTokenVariant]  # baseline first (KL 0), then one per strength
