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

Each strength passes the same policy check as a chat request (:func:`resolve_ablation`): a key
capped at 0.5 cannot get 1.0 through A/B. ``GET /ab`` serves the comparison page.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from importlib import resources

import torch
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel

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
)
from abliserve.server.completions import (
    ChoiceOutput,
    CompletionService,
    checked,
    merge,
    stop_token_ids,
)
from abliserve.server.engines.base import (
    AblationSpec,
    EngineError,
    GenerationRequest,
    SamplingOptions,
)
from abliserve.server.errors import ApiError, bad_request, shown
from abliserve.server.policy import (
    APPLIED_HEADER,
    DIRECTION_HEADER,
    STRENGTH_HEADER,
    AblationAsk,
    applied_json,
    describe_applied,
    resolve_ablation,
)
from abliserve.server.protocol import AblationApplied
from abliserve.server.request_intake import (
    api_state,
    check_model,
    key_policy,
    parse_body,
)

router = APIRouter()
STATIC = resources.files("abliserve.clients") / "static"
PAGE_FILES = {"ab.js": "text/javascript", "ab.css": "text/css"}  # what /ab/static serves


def resolve_variants(
    request: Request, strengths: Sequence[float], direction: str | None
) -> list[AblationSpec]:
    """Baseline plus one spec per strength, each resolved and authorised like a chat request.

    The direction may come from the body or the ``X-Ablation-Direction`` header (they must
    agree); strengths only from the body, since one header cannot carry several."""
    if request.headers.get(STRENGTH_HEADER) is not None:
        raise bad_request(
            f"A/B takes its strengths from the body field 'strengths', not {STRENGTH_HEADER}",
            STRENGTH_HEADER,
        )
    state = api_state(request)
    return [
        resolve_ablation(
            AblationAsk(
                header_direction=request.headers.get(DIRECTION_HEADER),
                body_strength=strength,
                body_direction=direction,
            ),
            state.policy,
            key_policy(request),
        )
        for strength in (0.0, *strengths)
    ]


def served_model(request: Request, name: str | None) -> str:
    state = api_state(request)
    if name is None:
        return state.served_model_names[0]
    check_model(state, name)
    return name


def refusal_flags(text: str) -> dict[str, RefusalFlags]:
    flags = {}
    for markers in MarkerList:
        matched = matched_markers(text, markers)
        flags[markers.value] = RefusalFlags(refused=bool(matched), markers=matched)
    return flags


def variant_label(spec: AblationSpec) -> str:
    return "baseline" if not spec.active else f"strength {spec.strength:g}"


def applied_header(specs: Sequence[AblationSpec]) -> str:
    return ", ".join(describe_applied(spec) for spec in specs)


def prompt_ids_of(service: CompletionService, body: ABRequest | FirstTokenRequest) -> list[int]:
    return service.chat_prompt_ids([message.model_dump() for message in body.messages])


def sampling_of(
    service: CompletionService, body: ABRequest, prompt_ids: list[int]
) -> SamplingOptions:
    """One set of options for every variant (same seed): only the ablation differs."""
    return SamplingOptions(
        max_tokens=service.max_tokens_for(prompt_ids, body.max_tokens, "max_tokens"),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop_token_ids=tuple(stop_token_ids(service.tokenizer)),
    )


async def comparison(
    service: CompletionService,
    prompt_ids: list[int],
    sampling: SamplingOptions,
    stop: list[str],
    specs: list[AblationSpec],
) -> AsyncIterator[ABStreamDelta | ABStreamResult]:
    """Run all variants concurrently; yield text deltas as they come and each variant's result
    as it finishes. Closing this iterator aborts every variant still running."""
    started = time.perf_counter()
    first_token: list[float | None] = [None] * len(specs)
    outputs = [ChoiceOutput(index=i) for i in range(len(specs))]
    streams = [
        service.stream(prompt_ids, sampling, spec, stop=stop, index=i, endpoint="ab")
        for i, spec in enumerate(specs)
    ]
    async with aclosing(merge(streams)) as deltas:
        async for delta in deltas:
            i = delta.index
            if first_token[i] is None and delta.token_ids:
                first_token[i] = time.perf_counter() - started
            outputs[i].add(delta)
            if delta.text:
                yield ABStreamDelta(variant=i, text=delta.text)
            if delta.finish_reason is not None:
                yield ABStreamResult(
                    variant=i,
                    result=ABVariant(
                        label=variant_label(specs[i]),
                        ablation=AblationApplied(**applied_json(specs[i])),
                        text=outputs[i].text,
                        token_ids=outputs[i].token_ids,
                        finish_reason=outputs[i].finish_reason,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(outputs[i].token_ids),
                        latency_s=time.perf_counter() - started,
                        first_token_s=first_token[i],
                        refusal=refusal_flags(outputs[i].text),
                    ),
                )


def event(name: str, payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"event: {name}\ndata: {data}\n\n"


@router.post("/v1/ab")
async def ab(request: Request) -> Response:
    body = await parse_body(request, ABRequest)
    service = api_state(request).service
    model = served_model(request, body.model)
    specs = resolve_variants(request, body.strengths, body.direction)
    # Every check runs before the first byte, so a bad prompt is a 400 even when streaming.
    prompt_ids = prompt_ids_of(service, body)
    sampling = sampling_of(service, body, prompt_ids)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    request_id = f"ab-{uuid.uuid4().hex}"
    headers = {APPLIED_HEADER: applied_header(specs)}
    variants = comparison(service, prompt_ids, sampling, stop, specs)

    if body.stream:

        async def events() -> AsyncIterator[str]:
            start = ABStreamStart(
                id=request_id,
                model=model,
                variants=[AblationApplied(**applied_json(spec)) for spec in specs],
            )
            yield event("start", start)
            try:
                async with aclosing(variants) as items:
                    async for item in items:
                        yield event("delta" if isinstance(item, ABStreamDelta) else "result", item)
            except (EngineError, ApiError) as error:
                yield event("error", {"message": str(error)})
                return
            yield event("done", {})

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def collect() -> list[ABVariant]:
        results: list[ABVariant | None] = [None] * len(specs)
        async with aclosing(variants) as items:
            async for item in items:
                if isinstance(item, ABStreamResult):
                    results[item.variant] = item.result
        return [result for result in results if result is not None]

    response = ABResponse(
        id=request_id,
        model=model,
        seed=body.seed,
        variants=await collect(),
    )
    return Response(response.model_dump_json(), media_type="application/json", headers=headers)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference ‖ other) in nats from two log-probability vectors over one vocabulary,
    computed on the tensors (no per-token Python objects); tokens impossible under the
    reference contribute nothing."""
    log_p, log_q = reference.double(), other.double()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return max(float(terms.sum()), 0.0)


async def first_token_log_probs(
    service: CompletionService, prompt_ids: list[int], spec: AblationSpec
) -> torch.Tensor:
    """The whole first-token log-probability vector (untempered) of one prompt at one
    ablation, as one tensor straight from the engine."""
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt_ids,
        sampling=SamplingOptions(
            max_tokens=1, temperature=0.0, ignore_eos=True, full_distribution=True
        ),
        ablation=spec,
    )
    async with aclosing(checked(service.engine.generate(request))) as chunks:
        async for chunk in chunks:
            if chunk.distribution is not None:
                return chunk.distribution
    raise EngineError("the engine returned no distribution for the first token")


@router.post("/v1/ab/first-token")
async def first_token(request: Request) -> Response:
    """Bounded: each distinct variant runs once (``[0, 0, 0]`` is one engine request), each
    holds a concurrency slot while it runs (429 beyond the limit), non-zero strengths need
    ablation rights like any request, and the KL is computed from tensors."""
    body = await parse_body(request, FirstTokenRequest)
    service = api_state(request).service
    model = served_model(request, body.model)
    specs = resolve_variants(request, body.strengths, body.direction)
    prompt_ids = prompt_ids_of(service, body)
    service.max_tokens_for(prompt_ids, 1, "max_tokens")
    distinct = list(dict.fromkeys(specs))
    with request.state.slots.extra(len(distinct) - 1):
        runs = asyncio.gather(*(first_token_log_probs(service, prompt_ids, s) for s in distinct))
        distributions = dict(zip(distinct, await runs, strict=True))
    baseline = distributions[specs[0]]

    def top(distribution: torch.Tensor) -> list[TokenProbability]:
        values, ids = torch.topk(distribution, min(body.top_logprobs, distribution.numel()))
        return [
            TokenProbability(token=service.tokenizer.decode([t]), token_id=t, logprob=v)
            for t, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]

    response = FirstTokenResponse(
        id=f"ft-{uuid.uuid4().hex}",
        model=model,
        prompt_tokens=len(prompt_ids),
        variants=[
            FirstTokenVariant(
                ablation=AblationApplied(**applied_json(spec)),
                kl_from_baseline=0.0 if i == 0 else kl_divergence(baseline, distributions[spec]),
                top=top(distributions[spec]),
            )
            for i, spec in enumerate(specs)
        ],
    )
    return Response(
        response.model_dump_json(),
        media_type="application/json",
        headers={APPLIED_HEADER: applied_header(specs)},
    )


@router.get("/ab", include_in_schema=False)
async def ab_page() -> FileResponse:
    return FileResponse(str(STATIC / "ab.html"), media_type="text/html")


@router.get("/ab/static/{name}", include_in_schema=False)
async def ab_page_file(name: str) -> FileResponse:
    if name not in PAGE_FILES:
        raise ApiError(404, f"no page file {shown(name)}")
    return FileResponse(str(STATIC / name), media_type=PAGE_FILES[name])
