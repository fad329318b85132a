"""The FastAPI application: lifespan (engine and tokenizer), auth, error shapes, small routes.

The generation routes live in :mod:`abliserve.server.openai_api`. Every error a client causes
leaves as OpenAI-shaped JSON with the right status; anything else is a 500 of the same shape,
and never takes the engine down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.projection import site_layer
from abliserve.server.ab import router as ab_router
from abliserve.server.completions import CompletionService
from abliserve.server.engines import EngineOptions, create_engine, resolve_engine_kind
from abliserve.server.engines.base import EngineError
from abliserve.server.errors import ApiError, error_body
from abliserve.server.limits import LimitsMiddleware, RequestLimits
from abliserve.server.metrics import ServerMetrics
from abliserve.server.openai_api import router
from abliserve.server.policy import ApiKeys, ServerPolicy
from abliserve.server.protocol import DirectionCard, DirectionList, ModelCard, ModelList
from abliserve.server.request_intake import ApiState

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Everything ``abliserve serve`` decided before the model loads (all of it validated)."""

    checkpoint: Path
    identity: ModelIdentity
    directions: dict[str, DirectionArtifact]
    served_model_names: list[str]
    policy: ServerPolicy
    keys: ApiKeys = field(default_factory=ApiKeys)
    engine: str = "auto"
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    limits: RequestLimits = field(default_factory=RequestLimits)
    metrics_require_key: bool = False  # --metrics-require-key: /metrics needs a valid key
    health_require_key: bool = False  # --health-require-key: /health needs a valid key
    tool_call_parser: str | None = None  # --tool-call-parser (vLLM engine): tool_choice "auto"


def load_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def create_app(config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            config.engine,
            config.checkpoint,
            config.identity,
            config.directions,
            config.engine_options,
        )
        tokenizer = load_tokenizer(config.checkpoint)
        await engine.start()
        app.state.engine = engine
        if serves_vllm_surface:
            from abliserve.server.vllm_surface import build_surface

            app.state.vllm_surface = await build_surface(
                engine, config.served_model_names, config.tool_call_parser
            )
        app.state.metrics = ServerMetrics(engine.stats)
        app.state.api = ApiState(
            service=CompletionService(engine, tokenizer, app.state.metrics),
            policy=config.policy,
            keys=config.keys,
            served_model_names=config.served_model_names,
        )
        log.info(
            "abliserve ready: %s engine, model %s, directions %s",
            engine.name,
            config.served_model_names[0],
            ", ".join(config.directions) or "none",
        )
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="abliserve", lifespan=lifespan)
    app.state.config = config
    app.state.started = int(time.time())
    serves_vllm_surface = resolve_engine_kind(config.engine) == "vllm"
    if serves_vllm_surface:  # chat and completions through vLLM's own OpenAI serving
        from abliserve.server.vllm_surface import router as vllm_router

        app.include_router(vllm_router)
    else:
        app.include_router(router)
    app.include_router(ab_router)  # /v1/ab, /v1/ab/first-token, the /ab page
    keyed_paths = {
        path
        for path, required in (
            ("/metrics", config.metrics_require_key),
            ("/health", config.health_require_key),
        )
        if required
    }

    @app.middleware("http")
    async def authenticate(request: Request, call_next) -> Response:
        """Check the API key of /v1 requests (and /metrics, /health where the operator asks)
        before the body is read (401 beats 400)."""
        path = request.url.path
        if path.startswith("/v1/") or path in keyed_paths:
            try:
                request.state.key_policy = config.keys.authenticate(
                    request.headers.get("authorization")
                )
            except ApiError as error:
                count_error(request, error.status)
                return error.response()
        return await call_next(request)

    # Added last, so outermost: oversized or excess requests never reach auth or the routes.
    app.add_middleware(
        LimitsMiddleware, limits=config.limits, on_reject=lambda status: count_status(app, status)
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        count_error(request, error.status)
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        count_error(request, error.status_code)
        return JSONResponse(
            error_body(error.status_code, str(error.detail)), status_code=error.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s", request.url.path)
        count_error(request, 500)
        return JSONResponse(
            error_body(500, f"internal error: {type(error).__name__}"), status_code=500
        )

    @app.exception_handler(EngineError)
    async def engine_failed(request: Request, error: EngineError) -> JSONResponse:
        log.error("engine error serving %s: %s", request.url.path, error)
        count_error(request, error.status)
        return JSONResponse(error_body(error.status, str(error)), status_code=error.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        reason = app.state.engine.stopped()
        if reason is not None:
            return JSONResponse(error_body(503, reason), status_code=503)
        return JSONResponse({"status": "ok", "engine": app.state.engine.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        limit = app.state.engine.max_model_len
        return ModelList(
            data=[
                ModelCard(
                    id=name,
                    created=app.state.started,
                    root=config.identity.model_id,
                    max_model_len=limit,
                )
                for name in config.served_model_names
            ]
        )

    @app.get("/v1/directions")
    async def directions() -> DirectionList:
        return DirectionList(
            data=[
                DirectionCard(
                    name=name,
                    default=name == config.policy.default_direction,
                    model_id=artifact.model.model_id,
                    layers=sorted(
                        {
                            site_layer(i)
                            for i, w in enumerate(artifact.weights.tolist())
                            if w != 0 and bool(artifact.directions[i].any())
                        }
                    ),
                    method=artifact.method,
                    scores=artifact.scores,
                )
                for name, artifact in config.directions.items()
            ],
            default_strength=config.policy.default_strength,
            strength_range=config.policy.strength_range,
        )

    return app


def count_error(request: Request, status: int) -> None:
    count_status(request.app, status)


def count_status(app: FastAPI, status: int) -> None:
    metrics: ServerMetrics | None = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(status)).inc()
