"""Does batching pay? Throughput of N concurrent requests vs the same N one at a time, over HTTP.

Starts ``abliserve serve`` (transformers engine by default) on a free port, or uses ``--url``.
Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``), greedy; half of them
are ablated (strength 1 and 0.5 alternating), so the concurrent batch is a mixed one. Printed:
output tokens/s, mean time to first token, mean latency, and the concurrent/sequential ratio.

    .venv/bin/python bench/bench_batching.py                      # demo model, 16 requests
    .venv/bin/python bench/bench_batching.py --requests 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

BENCH = Path(__file__).resolve().parent


@dataclass
class Timing:
    tokens: int
    first_token_s: float
    latency_s: float


@dataclass
class RunResult:
    name: str
    wall_s: float
    timings: list[Timing]

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall_s


def prompts(count: int) -> list[str]:
    with open(BENCH / "data/jbb_harmful.csv", newline="") as handle:
        goals = [row["Goal"] for row in csv.DictReader(handle)]
    return goals[:count]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(model: str, engine: str, max_num_seqs: int):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "abliserve.cli",
        "serve",
        "--model",
        model,
        "--demo",
        "--engine",
        engine,
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        "--served-model-name",
        "bench",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}: {' '.join(command)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


async def one(
    api: openai.AsyncOpenAI, model: str, prompt: str, strength: float, max_tokens: int
) -> Timing:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = await api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "ablation": {"strength": strength}},
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Timing(tokens, first or 0.0, time.perf_counter() - started)


async def measure(url: str, model: str, count: int, max_tokens: int) -> list[RunResult]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=3600)
    texts = prompts(count)
    strengths = [(0.0, 1.0, 0.0, 0.5)[i % 4] for i in range(count)]
    await one(api, model, texts[0], 0.0, 4)  # warm-up
    started = time.perf_counter()
    sequential = [
        await one(api, model, p, s, max_tokens) for p, s in zip(texts, strengths, strict=True)
    ]
    sequential_run = RunResult("1 at a time", time.perf_counter() - started, sequential)
    print(f"sequential done: {sequential_run.tokens_per_s:.2f} tokens/s", flush=True)
    started = time.perf_counter()
    together = await asyncio.gather(
        *(one(api, model, p, s, max_tokens) for p, s in zip(texts, strengths, strict=True))
    )
    concurrent_run = RunResult(f"{count} concurrent", time.perf_counter() - started, together)
    return [sequential_run, concurrent_run]


def table(results: list[RunResult]) -> str:
    base = results[0].tokens_per_s
    lines = [
        "| run | output tokens | wall s | tokens/s | ratio | mean TTFT s | mean latency s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {sum(t.tokens for t in r.timings)} | {r.wall_s:.1f} | "
            f"{r.tokens_per_s:.2f} | {r.tokens_per_s / base:.2f}x | "
            f"{statistics.mean(t.first_token_s for t in r.timings):.2f} | "
            f"{statistics.mean(t.latency_s for t in r.timings):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--model", default="demo", help="model to serve (default: demo)")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    # Stop the server we started even when killed (a timeout sends SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.url:
        model = openai.OpenAI(base_url=f"{args.url}/v1", api_key="-").models.list().data[0].id
        results = asyncio.run(measure(args.url, model, args.requests, args.max_tokens))
    else:
        with server(args.model, args.engine, args.requests) as url:
            results = asyncio.run(measure(url, "bench", args.requests, args.max_tokens))
    print(
        f"{args.requests} requests x {args.max_tokens} tokens, greedy, half ablated "
        f"(strengths 0/1/0/0.5), engine {args.engine}"
    )
    print(table(results))


if __name__ == "__main__":
    main()
