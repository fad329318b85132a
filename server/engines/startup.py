"""Start the engine the operator asked for, or say in one line why it cannot start.

``--engine auto`` means auto: where the vLLM engine cannot start on this machine (not
installed, the model does not fit the memory, vLLM fails while starting), the transformers
engine serves instead, and one log line says why. ``--engine vllm`` fails instead, with the
cause and its fix in one :class:`EngineStartError` line (the CLI prints it as
``abliserve: error: ...`` and exits 2).

vLLM starts several processes that inherit the server's standard error; when one of them fails,
each prints its own traceback and vLLM's log lines run to hundreds. While the vLLM engine
starts, :class:`StartupOutput` holds that output back (``--verbose`` shows it), keeps the server's
own log lines flowing, and on failure picks the root cause (the first exception line) for the one
line. After a successful start everything passes through again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.errors import UserError
from abliserve.server.engines import EngineOptions, create_engine, resolve_engine_kind
from abliserve.server.engines.base import Engine

log = logging.getLogger(__name__)

OWN_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) abliserve")
# "ValueError: ...", "(EngineCore pid=12) torch.OutOfMemoryError: ..." in vLLM's processes.
EXCEPTION_LINE = re.compile(r"^(?:\([^)]*\)\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
GENERIC_CAUSES = ("See root cause above", "Engine core initialization failed")
# vLLM re-raises a worker's exception as "Worker failed with error '<cause>', please check ...".
WRAPPED_CAUSE = re.compile(r"Worker failed with error '(.+)', please check")
KEPT_LINES = 5000
SETTLE_SECONDS = 0.3  # a failed start's output is complete once the pipe is quiet this long


class EngineStartError(UserError):
    """The engine the operator asked for cannot start here; the message is the cause and fix."""


async def start_engine(
    kind: str,
    checkpoint: Path,
    identity: ModelIdentity,
    directions: dict[str, DirectionArtifact],
    options: EngineOptions,
    *,
    verbose: bool = False,
) -> Engine:
    """Build and start the engine ``kind`` (``auto``, ``vllm`` or ``transformers``)."""
    resolved = resolve_engine_kind(kind)
    if resolved == "vllm":
        try:
            return await _start_vllm(checkpoint, identity, directions, options, verbose)
        except UserError as error:
            if kind != "auto":
                raise EngineStartError(str(error)) from None
            log.warning(
                "the vLLM engine cannot start on this machine (%s); serving with the "
                "transformers engine instead (--engine vllm makes this an error)",
                str(error),
            )
    engine = create_engine("transformers", checkpoint, identity, directions, options)
    await engine.start()
    return engine


async def _start_vllm(
    checkpoint: Path,
    identity: ModelIdentity,
    directions: dict[str, DirectionArtifact],
    options: EngineOptions,
    verbose: bool,
) -> Engine:
    engine = create_engine("vllm", checkpoint, identity, directions, options)
    with StartupOutput(verbose) as output:
        try:
            await engine.start()
        except UserError:
            raise
        except Exception as error:  # vLLM raises many types here; the cause is in its output
            await engine.shutdown()
            await output.settled()
            raise EngineStartError(
                f"the vLLM engine did not start: {output.root_cause() or _describe(error)}"
                + ("" if verbose else " (--verbose shows vLLM's full output)")
            ) from None
    return engine


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class StartupOutput:
    """Hold back what this process and its children print while an engine starts.

    Standard output and error (vLLM logs to the first, tracebacks go to the second) are pointed
    at pipes before vLLM spawns its processes, so they inherit them; a thread per pipe forwards
    the server's own log lines (and everything when ``verbose``) to the real stream and keeps
    the rest for :meth:`root_cause`. On exit this process's streams are restored; the children
    keep writing into the pipes, and from then on every line they write is forwarded.
    """

    FDS = (1, 2)

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.lines: collections.deque[str] = collections.deque(maxlen=KEPT_LINES)
        self._passthrough = False
        self._saved: dict[int, int] = {}
        self._last_line = time.monotonic()

    def __enter__(self) -> StartupOutput:
        for fd in self.FDS:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            self._saved[fd] = os.dup(fd)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, fd)
            os.close(write_fd)
            threading.Thread(
                target=self._pump, args=(read_fd, self._saved[fd]), daemon=True
            ).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._passthrough = True
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)

    def _pump(self, read_fd: int, real_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as stream:
            for raw in stream:
                self._last_line = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\n")
                if self._passthrough or self.verbose or OWN_LINE.match(line):
                    os.write(real_fd, raw)
                else:
                    self.lines.append(line)

    async def settled(self, limit: float = 5.0) -> None:
        """Wait (at most ``limit`` seconds) until the failed processes' output has arrived."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and time.monotonic() - self._last_line < SETTLE_SECONDS:
            await asyncio.sleep(0.05)

    def root_cause(self) -> str | None:
        """The first specific exception line the engine's processes printed, if any."""
        causes = [m for line in self.lines if (m := EXCEPTION_LINE.match(line.strip()))]
        specific = [m for m in causes if not any(g in m.group(2) for g in GENERIC_CAUSES)]
        chosen = (specific or causes or [None])[0]
        if chosen is None:
            return None
        wrapped = WRAPPED_CAUSE.search(chosen.group(2))
        return wrapped.group(1) if wrapped else f"{chosen.group(1)}: {chosen.group(2)}"
