"""A dead engine ends the server: exit non-zero so a supervisor restarts it.

A server whose engine can serve nothing more (a vLLM worker killed by the OOM killer, the
transformers engine's thread gone) would otherwise stay up answering 503 forever: a zombie that
only a health-checking supervisor notices. vLLM's own server exits instead, and so does
abliserve. :func:`watch_engine` polls :meth:`Engine.stopped`; once it reports a cause, the
server logs one line, stops accepting connections, lets in-flight requests end (they fail fast
with 503: their engine is gone) and the process exits with :data:`ENGINE_DIED_EXIT_CODE`, which
systemd (``Restart=on-failure``) and Kubernetes both act on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from abliserve.server.engines.base import Engine

ENGINE_DIED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, restarting helps
WATCH_INTERVAL_S = 0.5

log = logging.getLogger(__name__)


async def watch_engine(
    engine: Engine, on_death: Callable[[str], None], interval_s: float = WATCH_INTERVAL_S
) -> None:
    """Return once the engine has stopped, after logging why and calling ``on_death(reason)``."""
    while (reason := engine.stopped()) is None:
        await asyncio.sleep(interval_s)
    log.error(
        "the engine stopped (%s); shutting down with exit status %d so a supervisor restarts "
        "the server",
        reason,
        ENGINE_DIED_EXIT_CODE,
    )
    on_death(reason)
