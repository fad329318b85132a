"""OpenAI-shaped request and response bodies, plus abliserve's extensions.

Extensions (all optional, ignored by plain OpenAI clients):
  ``ablation: {"strength": float, "direction": str}`` in requests (OpenAI SDK ``extra_body``);
  ``ablation`` in responses and in the first and last stream chunk: what was applied;
  ``return_token_ids`` (as in vLLM): each choice carries the generated ``token_ids``;
  ``ignore_eos`` (as in vLLM): generate exactly ``max_tokens`` tokens (benchmarks).

These models are the transformers engine's request surface (the vLLM engine validates with
vLLM's own request models). A field they do not name is a 400 naming it, never ignored: a client
sending ``tools`` or ``response_format`` must learn that this engine cannot honour them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP_STRINGS = 16  # vLLM bounds stop lists too; each string is searched after every token
MAX_STOP_CHARS = 4096  # all stop strings together
MAX_CHOICES = 64  # prompts x n per request: one request must not flood the engine
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # biased tokens per request: bounds the per-token work of one row
MAX_STOP_TOKEN_IDS = 64
MAX_REPETITION_PENALTY = 10.0
LOGIT_BIAS_RANGE = (-100.0, 100.0)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # int64, as OpenAI documents; engines' RNGs take these


def check_stop(stop: str | list[str] | None) -> str | list[str] | None:
    """Bound ``stop``: a list of 60,000 strings once made every token of every choice cost
    60,000 searches on the event loop, stalling the whole server."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if sum(map(len, stops)) > MAX_STOP_CHARS:
        raise ValueError(f"the stop strings may hold at most {MAX_STOP_CHARS} characters together")
    return stop


StopStrings = Annotated[str | list[str] | None, AfterValidator(check_stop)]


class AblationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strength: float | None = None
    direction: str | None = Field(default=None, min_length=1, max_length=200)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions; the sampling controls mean what vLLM's
    fields of the same names mean."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: StopStrings = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ablation: AblationBody | None = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


# -- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AblationApplied(BaseModel):
    direction: str | None
    strength: float


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ablation: AblationApplied


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    ablation: AblationApplied | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """A text completion, and (with ``object`` unchanged, as OpenAI does) a stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    ablation: AblationApplied | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "abliserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DirectionCard(BaseModel):
    name: str
    default: bool
    model_id: str
    layers: list[int]
    method: dict
    scores: dict
    slot: int | None = None  # its bank slot
    in_flight: int | None = None  # requests in flight that use it


class DirectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DirectionCard]
    default_strength: float
    strength_range: tuple[float, float]
    max_directions: int | None = None  # bank capacity: loaded directions plus free slots
