"""A/B comparison routes: the same chat request at baseline and at one or more strengths.

``POST /v1/ab`` runs every variant concurrently through the shared engine (so they share
batches), with the same sampling options and seed, and returns all outputs with refusal flags
under both marker lists (docs/EVAL.md), token counts and latencies. With ``"stream": true`` it
sends server-sent events instead, tagged by variant, so a page can fill the columns live::

    event: start   data: {"id", "model", "variants": [{"strength", "direction"}, ...]}
    event: delta   data: {"variant": 1, "text": "Sure"}            (many, interleaved)
    event: result  data: {"variant": 0, "result": {...ABVariant}}  (one per variant)
    event: done    data: {}
    event: error   data: {"message": ...}                          (instead of the rest)

``POST /v1/ab/first-token`` returns the first generated token's distribution at baseline and
at each strength with KL(baseline ‖ ablated): what ``abliserve eval`` needs to measure damage.
OpenAI's ``top_logprobs`` stops at 20 tokens, which truncates the distribution and biases KL, and
shipping the whole vocabulary's log-probabilities per prompt over HTTP would be wasteful; so the
server asks the engine for the full distribution as one tensor, computes the KL on tensors and
sends back the number (plus a few top tokens to look at). Its cost is bounded: distinct
variants only, one concurrency slot per variant (docs/RELIABILITY.md).

Each strength is resolved and authorised as a chat request's ablation is
(:func:`~abliserve.server.request_intake.resolve_request_ablation`): a key capped at 0.5 cannot
get 1.0 through A/B. ``GET /ab`` serves the comparison page.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from abliserve.refusal import MarkerList, matched_markers
from abliserve.server.ab_protocol import (
    ABRequest,
    ABResponse,
    ABStreamDelta,
    ABStreamResult,
    ABStreamStart,
    ABVariant,
    FirstTokenRequest,
    FirstTokenResponse,
    FirstTokenVariant,
    RefusalFlags,
    TokenProbability,
    VariantsRequest,
)
from abliserve.server.completions import (
    Choice,
    ChoiceOutput,
    Delta,
    Plan,
    respond,
    sse,
    stream_response,
)
from abliserve.server.engines.base import AblationSpec, EngineError
from abliserve.server.errors import ApiError, bad_request, shown
from abliserve.server.policy import STRENGTH_HEADER, applied_json
from abliserve.server.protocol import AblationApplied, AblationBody
from abliserve.server.request_intake import (
    api_state,
    check_model,
    parse_body,
    resolve_request_ablation,
)

router = APIRouter()
STATIC = resources.files("abliserve.clients") / "static"
PAGE_FILES = {"ab.js": "text/javascript", "ab.css": "text/css"}  # what /ab/static serves


@dataclass
class Variants:
    """An A/B-style request, checked: the served model's name, the ablation of each variant
    (baseline first) and the chat prompt every variant shares."""

    model: str
    specs: list[AblationSpec]
    prompt_ids: list[int]


def variants_of(request: Request, body: VariantsRequest) -> Variants:
    """The model (the first served name when unset), each strength resolved and authorised like
    a chat request, and the chat template applied once.

    The direction may come from the body or the ``X-Ablation-Direction`` header (they must
    agree); strengths only from the body, since one header cannot carry several."""
    state = api_state(request)
    if body.model is not None:
        check_model(state, body.model)
    if request.headers.get(STRENGTH_HEADER) is not None:
        raise bad_request(
            f"A/B takes its strengths from the body field 'strengths', not {STRENGTH_HEADER}",
            STRENGTH_HEADER,
        )
    specs = [
        resolve_request_ablation(
            request, AblationBody.model_construct(strength=strength, direction=body.direction)
        )
        for strength in (0.0, *body.strengths)
    ]
    prompt_ids = state.service.chat_prompt_ids([m.model_dump() for m in body.messages])
    return Variants(body.model or state.served_model_names[0], specs, prompt_ids)


def applied(spec: AblationSpec) -> AblationApplied:
    return AblationApplied(**applied_json(spec))


def refusal_flags(text: str) -> dict[str, RefusalFlags]:
    flags = {}
    for markers in MarkerList:
        matched = matched_markers(text, markers)
        flags[markers.value] = RefusalFlags(refused=bool(matched), markers=matched)
    return flags


@dataclass
class ABRenderer:
    """Each variant's result (the same object streamed and whole); the tagged SSE events."""

    id: str
    seed: int
    variants: Variants

    def result(self, output: ChoiceOutput) -> ABVariant:
        spec = self.variants.specs[output.index]
        return ABVariant(
            label="baseline" if not spec.active else f"strength {spec.strength:g}",
            ablation=applied(spec),
            text=output.text,
            token_ids=output.token_ids,
            finish_reason=output.finish_reason,
            prompt_tokens=len(self.variants.prompt_ids),
            completion_tokens=len(output.token_ids),
            latency_s=output.latency_s or 0.0,
            first_token_s=output.first_token_s,
            refusal=refusal_flags(output.text),
        )

    def whole(self, outputs: list[ChoiceOutput]) -> ABResponse:
        finished = [self.result(o) for o in outputs if o.finish_reason is not None]
        return ABResponse(id=self.id, model=self.variants.model, seed=self.seed, variants=finished)

    def opening(self) -> list[str]:
        variants = [applied(spec) for spec in self.variants.specs]
        return [
            sse(ABStreamStart(id=self.id, model=self.variants.model, variants=variants), "start")
        ]

    def piece(self, delta: Delta, output: ChoiceOutput) -> list[str]:
        text = ABStreamDelta(variant=delta.index, text=delta.text)
        events = [sse(text, "delta")] if delta.text else []
        if delta.finish_reason is not None:
            result = ABStreamResult(variant=delta.index, result=self.result(output))
            events.append(sse(result, "result"))
        return events

    def ending(self, outputs: list[ChoiceOutput], error: Exception | None) -> list[str]:
        if error is not None:
            return [sse({"message": str(error)}, "error")]
        return [sse({}, "done")]


@router.post("/v1/ab")
async def ab(request: Request) -> Response:
    body = await parse_body(request, ABRequest)
    variants = variants_of(request, body)
    service = api_state(request).service
    # Every check runs before the first byte, so a bad prompt is a 400 even when streaming.
    max_tokens = service.max_tokens_for(variants.prompt_ids, body.max_tokens)
    # One set of options for every variant (same seed): only the ablation differs.
    sampling = service.sampling(
        max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
    )
    choices = [Choice(variants.prompt_ids, sampling, spec) for spec in variants.specs]
    plan = Plan("ab", choices, len(variants.prompt_ids), variants.specs, body.stop)
    renderer = ABRenderer(f"ab-{uuid.uuid4().hex}", body.seed, variants)
    if body.stream:
        return stream_response(plan, service, renderer)
    return await respond(plan, service, renderer)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference ‖ other) in nats from two log-probability vectors over one vocabulary,
    computed on the tensors (no per-token Python objects); tokens impossible under the
    reference contribute nothing."""
    log_p, log_q = reference.double(), other.double()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return max(float(terms.sum()), 0.0)


@dataclass
class FirstTokenRenderer:
    """Each requested variant's first-token distribution (distinct ones ran once), its KL from
    the baseline's and its top tokens."""

    variants: Variants
    distinct: list[AblationSpec]  # the plan's choices, in order
    top_logprobs: int
    tokenizer: object

    def top(self, distribution: torch.Tensor) -> list[TokenProbability]:
        values, ids = torch.topk(distribution, min(self.top_logprobs, distribution.numel()))
        return [
            TokenProbability(token=self.tokenizer.decode([t]), token_id=t, logprob=v)
            for t, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]

    def whole(self, outputs: list[ChoiceOutput]) -> FirstTokenResponse:
        if any(o.distribution is None for o in outputs):
            raise EngineError("the engine returned no distribution for the first token")
        distributions = {
            spec: o.distribution for spec, o in zip(self.distinct, outputs, strict=True)
        }
        baseline = distributions[self.variants.specs[0]]
        return FirstTokenResponse(
            id=f"ft-{uuid.uuid4().hex}",
            model=self.variants.model,
            prompt_tokens=len(self.variants.prompt_ids),
            variants=[
                FirstTokenVariant(
                    ablation=applied(spec),
                    kl_from_baseline=0.0
                    if i == 0
                    else kl_divergence(baseline, distributions[spec]),
                    top=self.top(distributions[spec]),
                )
                for i, spec in enumerate(self.variants.specs)
            ],
        )


@router.post("/v1/ab/first-token")
async def first_token(request: Request) -> Response:
    """Bounded: each distinct variant runs once (``[0, 0, 0]`` is one engine request), each
    holds a concurrency slot while it runs (429 beyond the limit), non-zero strengths need
    ablation rights like any request, and the KL is computed from tensors: the engine returns
    the whole (untempered) first-token log-probability vector as one tensor."""
    body = await parse_body(request, FirstTokenRequest)
    variants = variants_of(request, body)
    service = api_state(request).service
    service.max_tokens_for(variants.prompt_ids, 1)
    sampling = service.sampling(1, temperature=0.0, ignore_eos=True, full_distribution=True)
    distinct = list(dict.fromkeys(variants.specs))
    choices = [Choice(variants.prompt_ids, sampling, spec) for spec in distinct]
    plan = Plan("first_token", choices, len(variants.prompt_ids), variants.specs)
    renderer = FirstTokenRenderer(variants, distinct, body.top_logprobs, service.tokenizer)
    with request.state.slots.extra(len(distinct) - 1):
        return await respond(plan, service, renderer)


@router.get("/ab", include_in_schema=False)
async def ab_page() -> FileResponse:
    return FileResponse(str(STATIC / "ab.html"), media_type="text/html")


@router.get("/ab/static/{name}", include_in_schema=False)
async def ab_page_file(name: str) -> FileResponse:
    if name not in PAGE_FILES:
        raise ApiError(404, f"no page file {shown(name)}")
    return FileResponse(str(STATIC / name), media_type=PAGE_FILES[name])
