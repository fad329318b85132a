"""Load generation shared by the bench scripts: the pinned prompt set, streamed requests with
per-token timestamps through any :class:`Engine`, concurrency-limited runs, the baked
checkpoint, and the peak resident memory of a process tree.

Engines are driven in-process (token ids in, token ids out), so the numbers are the engines'
own and not the HTTP layer's; ``bench_batching.py`` measures over HTTP.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from stats import RequestTrace

from abliserve.demo_model import cache_root
from abliserve.directions.artifact import DirectionArtifact
from abliserve.server.engines.base import GenerationRequest

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DIRECTION = REPO / "abliserve/data/directions/qwen2.5-coder-0.5b-instruct.safetensors"
# JailbreakBench's harmful behaviours (MIT), copied into the repo and pinned by hash: harmful
# prompts make "did it ablate?" visible in the first tokens (a refusal turns into an answer).
PROMPT_FILE = BENCH / "data/jbb_harmful.csv"
PROMPT_SHA256 = "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516"


def load_prompts(count: int) -> list[str]:
    """The first ``count`` JailbreakBench goals, refusing a file that is not the pinned one."""
    digest = hashlib.sha256(PROMPT_FILE.read_bytes()).hexdigest()
    if digest != PROMPT_SHA256:
        raise SystemExit(f"{PROMPT_FILE} changed (sha256 {digest}); the benchmark pins it")
    with open(PROMPT_FILE, newline="") as handle:
        goals = [row["Goal"] for row in csv.DictReader(handle)]
    return goals[:count]


def chat_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as a one-turn chat prompt, the way the HTTP layer tokenises it."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
            )
        )
        for text in texts
    ]


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (vLLM reads several at engine start)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def timed_request(engine, request: GenerationRequest) -> RequestTrace:
    """Stream one request, stamping every token with its arrival time."""
    start = time.perf_counter()
    times: list[float] = []
    tokens: list[int] = []
    async for chunk in engine.generate(request):
        now = time.perf_counter()
        times.extend([now] * len(chunk.token_ids))
        tokens.extend(chunk.token_ids)
    return RequestTrace(start, tuple(times), tuple(tokens))


async def run_concurrent(
    engine, requests: Sequence[GenerationRequest], concurrency: int
) -> tuple[float, list[RequestTrace]]:
    """Send ``requests`` with at most ``concurrency`` in flight; (wall seconds, traces in
    request order). A request's clock starts when it gets a slot, as a client's would."""
    gate = asyncio.Semaphore(concurrency)

    async def limited(request: GenerationRequest) -> RequestTrace:
        async with gate:
            return await timed_request(engine, request)

    start = time.perf_counter()
    traces = await asyncio.gather(*(limited(request) for request in requests))
    return time.perf_counter() - start, list(traces)


def baked_path(checkpoint: Path, artifact: DirectionArtifact, alpha: float = 1.0) -> Path:
    """Where :func:`baked_checkpoint` keeps the export (the artifact's hash in the name, so a
    new direction gets a new export)."""
    digest = hashlib.sha256(artifact.directions.numpy().tobytes()).hexdigest()[:12]
    return cache_root() / "bench" / f"{checkpoint.name}-ablated-{alpha:g}-{digest}"


def baked_checkpoint(checkpoint: Path, artifact: DirectionArtifact, alpha: float = 1.0) -> Path:
    """The checkpoint orthogonalised at ``alpha`` by ``abliserve export`` (cached between runs)."""
    from abliserve.directions.export import export_checkpoint

    out = baked_path(checkpoint, artifact, alpha)
    if not out.exists():
        export_checkpoint(checkpoint, artifact, alpha, out, "refusal")
    return out


class PeakRss:
    """Peak resident memory of a process and all its descendants (vLLM runs its engine core
    in child processes), sampled every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for process in [root, *root.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
            except psutil.NoSuchProcess:
                return
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
