"""What compiling buys and costs on this machine: the vLLM engine eager vs compiled, one run.

On CPU the server starts vLLM eager unless ``--no-enforce-eager`` is given (docs/ENGINES.md,
"Sizing vLLM on CPU"). This measures that choice: for each mode, the engine's start time (process
spawn, weights, plugin, compile and warm-up where compiled) and its decode throughput with the
demo direction at alpha 0/1 mixed, at 1 and 32 concurrent requests; then compiled/eager ratios.
Both engines are sized the way the server sizes them.

    .venv/bin/python bench/start_modes.py --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench_vllm_overhead import FULL, PROMPTS, Measurement, run_mix
from loadgen import DIRECTION, chat_token_ids

from abliserve.datasets import load_instructions
from abliserve.demo_model import provision_demo_model
from abliserve.directions.artifact import load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines.base import BASELINE

MODES = {"eager": True, "compiled": False}


async def measure_mode(checkpoint, artifact, prompts, eager: bool, args) -> tuple[float, list]:
    from abliserve.server.engines.vllm_engine import VllmEngine

    engine = VllmEngine(
        checkpoint,
        checkpoint_identity(checkpoint),
        {"refusal": artifact},
        dtype="float32",
        enforce_eager=eager,
        max_model_len=1024,
        enable_prefix_caching=False,
    )
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        await run_mix(engine, prompts, [BASELINE, FULL], 32, 32, 4, "warm-up")
        results = [
            await run_mix(engine, prompts, [BASELINE, FULL], conc, conc, args.tokens, "mixed")
            for conc in (1, 32)
        ]
    finally:
        await engine.shutdown()
    return start_s, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    checkpoint = provision_demo_model()
    artifact = load_artifact(DIRECTION)
    prompts = chat_token_ids(
        AutoTokenizer.from_pretrained(checkpoint), load_instructions(PROMPTS)[:32]
    )
    measured: dict[str, tuple[float, list[Measurement]]] = {}
    for mode, eager in MODES.items():
        measured[mode] = asyncio.run(measure_mode(checkpoint, artifact, prompts, eager, args))
        print(f"{mode}: started in {measured[mode][0]:.1f} s", flush=True)
    eager_start, eager_rows = measured["eager"]
    compiled_start, compiled_rows = measured["compiled"]
    print(f"\n{'':<28} {'eager':>10} {'compiled':>10} {'compiled/eager':>15}")
    print(
        f"{'engine start (s)':<28} {eager_start:>10.1f} {compiled_start:>10.1f} "
        f"{compiled_start / eager_start:>15.2f}"
    )
    for eager_m, compiled_m in zip(eager_rows, compiled_rows, strict=True):
        label = f"tok/s at {eager_m.concurrency} concurrent"
        print(
            f"{label:<28} {eager_m.tokens_per_s:>10.1f} {compiled_m.tokens_per_s:>10.1f} "
            f"{compiled_m.tokens_per_s / eager_m.tokens_per_s:>15.2f}"
        )


if __name__ == "__main__":
    main()
