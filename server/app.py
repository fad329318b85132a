"""The FastAPI application: lifespan (engine, tokenizer, engine watchdog), the middleware
stack (CORS, :mod:`~abliserve.server.guard`, :mod:`~abliserve.server.limits`), error shapes,
small routes.

The generation routes live in :mod:`abliserve.server.openai_api`. Every error a client causes
leaves as OpenAI-shaped JSON with the right status; anything else is a 500 of the same shape,
and never takes the engine down. A dead engine ends the server (:mod:`~abliserve.server.watchdog`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.errors import UserError
from abliserve.server.ab import router as ab_router
from abliserve.server.accesslog import redact_access_log
from abliserve.server.completions import CompletionService
from abliserve.server.directions_api import router as directions_router
from abliserve.server.engines import EngineOptions
from abliserve.server.engines.base import EngineError
from abliserve.server.engines.startup import start_engine
from abliserve.server.errors import ApiError, error_body
from abliserve.server.guard import AccessRules, GuardMiddleware
from abliserve.server.limits import LimitsMiddleware, RequestLimits
from abliserve.server.metrics import ServerMetrics
from abliserve.server.openai_api import router
from abliserve.server.openapi_bodies import document_request_bodies
from abliserve.server.policy import (
    APPLIED_HEADER,
    DIRECTION_HEADER,
    STRENGTH_HEADER,
    ApiKeys,
    ServerPolicy,
)
from abliserve.server.protocol import ModelCard, ModelList
from abliserve.server.request_intake import ApiState
from abliserve.server.watchdog import watch_engine

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
    verbose: bool = False  # --verbose: show the engine's own start-up output and tracebacks
    allowed_hosts: frozenset[str] | None = None  # Host names accepted (None: any)
    allowed_origins: list[str] = field(default_factory=list)  # --allowed-origins (CORS)
    tool_call_parser: str | None = None  # --tool-call-parser (vLLM engine): tool_choice "auto"


def load_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def create_app(config: ServerConfig) -> FastAPI:
    """The app; ``app.state.engine_death`` holds why the engine stopped (None while it serves),
    and ``app.state.request_exit``, when the CLI sets it, stops the server on that death."""

    def on_engine_death(reason: str) -> None:
        app.state.engine_death = reason
        if app.state.request_exit is not None:
            app.state.request_exit()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_access_log()
        tokenizer = load_tokenizer(config.checkpoint)
        try:
            engine = await start_engine(
                config.engine,
                config.checkpoint,
                config.identity,
                config.directions,
                config.engine_options,
                verbose=config.verbose,
            )
        except UserError as error:
            app.state.startup_error = error  # `abliserve serve` prints it as one line, exit 2
            raise
        if engine.name == "vllm":  # chat and completions through vLLM's own OpenAI serving
            from abliserve.server.vllm_surface import build_surface
            from abliserve.server.vllm_surface import router as vllm_router

            app.state.vllm_surface = await build_surface(
                engine, config.served_model_names, config.tool_call_parser
            )
            app.include_router(vllm_router)
        else:
            app.include_router(router)
        app.state.engine = engine
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
        watchdog = asyncio.create_task(watch_engine(engine, on_engine_death))
        try:
            yield
        finally:
            watchdog.cancel()
            await engine.shutdown()

    app = FastAPI(title="abliserve", lifespan=lifespan)
    app.state.config = config
    app.state.startup_error = None
    app.state.started = int(time.time())
    app.state.engine_death = None
    app.state.request_exit = None
    app.include_router(ab_router)  # /v1/ab, /v1/ab/first-token, the /ab page
    app.include_router(directions_router)  # /v1/directions: list, load, remove
    document_request_bodies(app, config.served_model_names)
    keyed_paths = frozenset(
        path
        for path, required in (
            ("/metrics", config.metrics_require_key),
            ("/health", config.health_require_key),
        )
        if required
    )

    def on_reject(status: int) -> None:
        count_status(app, status)

    # Each add_middleware wraps the previous: CORS (outermost), then the guard (Host, key,
    # content type), then the limits, so only requests that passed the guard take a slot.
    app.add_middleware(LimitsMiddleware, limits=config.limits, on_reject=on_reject)
    rules = AccessRules(keys=config.keys, hosts=config.allowed_hosts, keyed_paths=keyed_paths)
    app.add_middleware(GuardMiddleware, rules=rules, on_reject=on_reject)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", STRENGTH_HEADER, DIRECTION_HEADER],
            expose_headers=[APPLIED_HEADER],
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        count_error(request, error.status)
        body = error.body()
        body["error"]["message"] = config.keys.redact(body["error"]["message"])
        return JSONResponse(body, status_code=error.status)

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

    return app


def count_error(request: Request, status: int) -> None:
    count_status(request.app, status)


def count_status(app: FastAPI, status: int) -> None:
    metrics: ServerMetrics | None = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(status)).inc()
