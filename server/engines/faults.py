"""TEST-ONLY fault injection: make one chosen request fail inside the engine stream.

Off unless the server process starts with ``ABLISERVE_TEST_FAULTS=1`` (never set it in
production). When on, a request whose sampling ``seed`` equals :data:`FAULT_SEED` gets its first
token and then an :class:`EngineError`, exactly as if the engine had failed mid-generation; its
engine request is aborted on the way out. The reliability tests use it to prove that such a
failure is a 500 (or a stream ``error`` event) for that request alone while the server keeps
serving everyone else. A request seeded with :data:`STOP_SEED` instead stops the engine for
good, as a dead vLLM worker does: it and every later request get an
:class:`EngineStoppedError` (503) and ``/health`` answers 503. A seed is the one per-request
value that reaches the engine unchanged through every endpoint, so no test-only field is added
to the API.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing

from abliserve.server.engines.base import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationChunk,
    GenerationRequest,
)

FAULT_ENV = "ABLISERVE_TEST_FAULTS"
FAULT_SEED = 0xFA17ED
STOP_SEED = 0xDEAD0
STOPPED = "injected test stop"

log = logging.getLogger(__name__)


def faults_enabled() -> bool:
    return os.environ.get(FAULT_ENV) == "1"


def inject_faults(engine: Engine) -> Engine:
    """Wrap ``engine.generate`` and ``engine.stopped`` (on this instance only): requests seeded
    with FAULT_SEED fail, one seeded with STOP_SEED stops the engine."""
    log.warning(
        "%s=1: TEST-ONLY fault injection is on (seed %d fails, seed %d stops the engine)",
        FAULT_ENV,
        FAULT_SEED,
        STOP_SEED,
    )
    generate = engine.generate
    stopped: list[str] = []

    async def faulty_generate(request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if request.sampling.seed == STOP_SEED:
            stopped.append(STOPPED)
        if stopped:
            raise EngineStoppedError(STOPPED)
        async with aclosing(generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk
                if request.sampling.seed == FAULT_SEED:
                    raise EngineError("injected test fault")

    engine.generate = faulty_generate  # type: ignore[method-assign]
    engine.stopped = lambda: stopped[0] if stopped else None  # type: ignore[method-assign]
    return engine
