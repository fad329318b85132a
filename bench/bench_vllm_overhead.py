"""What per-request ablation costs inside vLLM, measured side by side in one run.

Engines (each started once, warmed, measured, shut down; one at a time):

  plain vLLM     the demo model with the abliserve plugin not loaded at all (VLLM_PLUGINS)
  abliserve      the same model with the plugin and the demo direction; three traffic mixes:
                 every request at alpha 0, every request at alpha 1, half at 1 and half at 0
  baked          the checkpoint `abliserve export` writes at alpha 1, served by plain vLLM:
                 the zero-overhead ceiling for fully ablated traffic

Each mix runs at 1 and at 32 concurrent requests (greedy, EOS ignored so every request yields
the same number of tokens) and reports output tokens/s, time to first token (TTFT) and
inter-token latency (ITL), then the ratios against plain vLLM. A last section profiles the
ablation op alone for one decode step of the 32-request batch, to say where the time goes.

    .venv/bin/python bench/bench_vllm_overhead.py            # compiled, bfloat16
    .venv/bin/python bench/bench_vllm_overhead.py --enforce-eager --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from dataclasses import dataclass

import torch
from loadgen import (
    DIRECTION,
    REPO,
    baked_checkpoint,
    chat_token_ids,
    environment,
    run_concurrent,
)
from op_profile import profile_one_step

from abliserve.datasets import load_instructions
from abliserve.demo_model import provision_demo_model
from abliserve.directions.artifact import load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    GenerationRequest,
    SamplingOptions,
)

PROMPTS = REPO / "bench/data/harmless_test.json"
FULL = AblationSpec("refusal", 1.0)
HEADER = f"{'engine / mix':<22} {'conc':>4} {'tok/s':>10} {'ratio':>6} {'TTFT ms':>9} {'ITL ms':>8}"


@dataclass
class Measurement:
    label: str
    concurrency: int
    tokens_per_s: float
    ttft_ms: float  # median over requests
    itl_ms: float  # median over requests of (last - first token time) / (tokens - 1)


async def run_mix(engine, prompts, mix, concurrency, requests, tokens, label) -> Measurement:
    """``requests`` requests, ``concurrency`` at a time, request i at ablation ``mix[i % len]``."""
    options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    jobs = [
        GenerationRequest(f"{label}-{concurrency}-{i}", prompts[i % len(prompts)], options, spec)
        for i, spec in enumerate(mix[i % len(mix)] for i in range(requests))
    ]
    wall, traces = await run_concurrent(engine, jobs, concurrency)
    return Measurement(
        label=label,
        concurrency=concurrency,
        tokens_per_s=sum(len(trace.token_ids) for trace in traces) / wall,
        ttft_ms=1000 * statistics.median(trace.ttft for trace in traces),
        itl_ms=1000 * statistics.median(_mean_itl(trace) for trace in traces),
    )


def _mean_itl(trace) -> float:
    """(last - first token time) / (tokens - 1) of one request."""
    times = trace.token_times
    return (times[-1] - times[0]) / max(len(times) - 1, 1)


async def measure_engine(engine, prompts, mixes, args) -> list[Measurement]:
    await engine.start()
    try:
        warm = [BASELINE, FULL] if engine.directions else [BASELINE]
        await run_mix(engine, prompts, warm, 32, 32, 4, "warm-up")
        results = []
        for label, mix in mixes.items():
            for concurrency in (1, 32):
                requests = args.solo_requests if concurrency == 1 else 32
                results.append(
                    await run_mix(engine, prompts, mix, concurrency, requests, args.tokens, label)
                )
                print(_row(results[-1], None), flush=True)
        return results
    finally:
        await engine.shutdown()


def _row(m: Measurement, base: Measurement | None) -> str:
    ratio = f"{m.tokens_per_s / base.tokens_per_s:6.3f}" if base else "      "
    return (
        f"{m.label:<22} {m.concurrency:>4} {m.tokens_per_s:>10.1f} {ratio} "
        f"{m.ttft_ms:>9.1f} {m.itl_ms:>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--solo-requests", type=int, default=4, help="requests at concurrency 1")
    parser.add_argument(
        "--dtype", default="float32", help="float32 default: CPUs without AVX512-BF16 emulate bf16"
    )
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--ablation-only",
        action="store_true",
        help="only the abliserve engine (ratios against its alpha=0 mix): one engine start",
    )
    parser.add_argument(
        "--kv-cache-gib",
        help="VLLM_CPU_KVCACHE_SPACE on CPU; default: sized to the machine, as the server does",
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from abliserve.server.engines.vllm_engine import VllmEngine

    if args.kv_cache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    checkpoint = provision_demo_model()
    artifact = load_artifact(DIRECTION)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = chat_token_ids(tokenizer, load_instructions(PROMPTS)[:32])
    options = {
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "max_model_len": 1024,
        "enable_prefix_caching": False,  # every mix pays its prefill, as fresh traffic would
    }
    baked = baked_checkpoint(checkpoint, artifact)
    print(HEADER)
    results: list[Measurement] = []
    if not args.ablation_only:
        with environment(VLLM_PLUGINS="none"):
            plain = VllmEngine(checkpoint, checkpoint_identity(checkpoint), {}, **options)
            results += asyncio.run(measure_engine(plain, prompts, {"plain vLLM": [BASELINE]}, args))
    ablating = VllmEngine(
        checkpoint, checkpoint_identity(checkpoint), {"refusal": artifact}, **options
    )
    mixes = {
        "abliserve alpha=0": [AblationSpec("refusal", 0.0)],
        "abliserve alpha=1": [FULL],
        "abliserve half 1/0": [FULL, BASELINE],
    }
    results += asyncio.run(measure_engine(ablating, prompts, mixes, args))
    if not args.ablation_only:
        with environment(VLLM_PLUGINS="none"):
            ceiling = VllmEngine(baked, checkpoint_identity(baked), {}, **options)
            results += asyncio.run(
                measure_engine(ceiling, prompts, {"baked alpha=1": [BASELINE]}, args)
            )

    reference = "abliserve alpha=0" if args.ablation_only else "plain vLLM"
    base = {m.concurrency: m for m in results if m.label == reference}
    mode = "eager" if args.enforce_eager else "compiled"
    print(f"\n## vLLM ablation overhead ({mode}, {args.dtype}, {args.tokens} tokens/request)")
    print(HEADER)
    for m in results:
        print(_row(m, base[m.concurrency]))
    identity = checkpoint_identity(checkpoint)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16
    print()
    sites = 2 * identity.num_layers + 1
    per_step_ms, table = profile_one_step(identity.hidden_size, sites, 32, dtype)
    shape = f"{sites} sites x [32, {identity.hidden_size}] {dtype}"
    print(f"ablation op alone, {shape}: {per_step_ms:.2f} ms per decode step\n{table}")


if __name__ == "__main__":
    main()
