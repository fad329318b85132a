"""Fault injection for the reliability tests: make one chosen request fail inside the engine.

Run as ``python tests/fault_injection.py serve ...`` (what :func:`reliability_harness.served`
does with ``faults=True``), it is ``abliserve serve`` with the engine wrapped: a request whose
sampling ``seed`` equals :data:`FAULT_SEED` gets its first token and then an
:class:`EngineError`, exactly as if the engine had failed mid-generation; its engine request is
aborted on the way out. The reliability tests use it to prove that such a failure is a 500 (or a
stream ``error`` event) for that request alone while the server keeps serving everyone else. A
request seeded with :data:`STOP_SEED` instead stops the engine for good, as a dead vLLM worker
does: it and every later request get an :class:`EngineStoppedError` (503) and ``/health``
answers 503. A seed is the one per-request value that reaches the engine unchanged through every
endpoint, so no test-only field is added to the API, and nothing of this ships in the package.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from abliserve.server.engines.base import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationChunk,
    GenerationRequest,
)

FAULT_SEED = 0xFA17ED
STOP_SEED = 0xDEAD0
STOPPED = "injected test stop"

log = logging.getLogger(__name__)


def inject_faults(engine: Engine) -> Engine:
    """Wrap ``engine.generate`` and ``engine.stopped`` (on this instance only): requests seeded
    with FAULT_SEED fail, one seeded with STOP_SEED stops the engine."""
    log.warning(
        "TEST-ONLY fault injection is on (seed %d fails, seed %d stops the engine)",
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


def main(argv: list[str]) -> int:
    """``abliserve`` with every engine the server builds wrapped by :func:`inject_faults`."""
    from abliserve import cli
    from abliserve.server import app

    start_engine = app.start_engine

    async def start_faulty_engine(*args: Any, **kwargs: Any) -> Engine:
        return inject_faults(await start_engine(*args, **kwargs))

    app.start_engine = start_faulty_engine
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
