"""Plain vLLM serving the ablation as a LoRA adapter, against abliserve's plugin and plain vLLM,
in one run.

    .venv/bin/python bench/bench_lora.py --prompts 32 --tokens 16 --rounds 2

Engines (the demo model, float32, eager, prefix caching off, one engine alive at a time):

  plain    plain vLLM, plugin not loaded: baseline requests
  lora     plain vLLM with LoRA enabled (max rank 1, 2 slots), serving
           ``abliserve export --format lora`` at alpha 1: the adapter on every request,
           baseline on every request, and the two interleaved 50/50 in one stream
  plugin   abliserve's plugin: alpha 1 on every request, and alpha 1 / baseline interleaved

Each configuration submits all prompts at once (``LLM.generate``: one stream, shared continuous
batches), greedy, exactly ``--tokens`` output tokens, after one warm-up; reported is the median
output tokens/s over ``--rounds``, ratios between configurations, and whether the tokens that
must agree do (adapter = plugin at alpha 1 and baseline = plain, row by row).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import DIRECTION, chat_token_ids, environment, load_prompts

from abliserve.demo_model import cache_root
from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.directions.lora import export_lora
from abliserve.server.engines.vllm_plugin import force_v1_runner, plugin_config
from abliserve.server.engines.vllm_routing import ablation_extra_args

ADAPTER_NAME = "ablated"


@dataclass(frozen=True)
class Job:
    """One request: a prompt, and how it is ablated (a vLLM LoRARequest, or abliserve's
    per-request ``extra_args``; neither = baseline)."""

    prompt: list[int]
    adapter: Any = None
    extra_args: dict[str, Any] | None = None


@contextmanager
def offline_vllm(
    checkpoint: Path,
    *,
    lora: bool = False,
    artifact: DirectionArtifact | None = None,
    prefix_caching: bool = False,
) -> Iterator[Any]:
    """A vLLM ``LLM`` on ``checkpoint``: plain (abliserve's plugin not loaded), with LoRA, or
    with the plugin holding ``artifact`` as direction slot 1. Shut down on exit."""
    from vllm import LLM

    options: dict[str, Any] = {
        "model": str(checkpoint),
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 1024,
        "enable_prefix_caching": prefix_caching,
        "seed": 0,
    }
    if lora:
        # One LoRA slot more than adapters: vLLM 0.32's CPU LoRA ops read a no-LoRA row's slot
        # index -1 as "the last slot", so with max_loras=1 baseline requests batched beside
        # adapter requests silently get the adapter too; an always-empty last slot adds zero.
        options.update(enable_lora=True, max_lora_rank=1, max_loras=2)
    plugins = {"VLLM_PLUGINS": "none"}
    if artifact is not None:
        force_v1_runner()
        options["additional_config"] = plugin_config(
            {"refusal": artifact}, cache_root() / "vllm-directions"
        )
        plugins = {}
    with environment(VLLM_CPU_KVCACHE_SPACE="1", **plugins):
        llm = LLM(**options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def adapter_request(adapter: Path) -> Any:
    """The per-request handle of an adapter folder (what ``--lora-modules`` names)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(ADAPTER_NAME, 1, str(adapter))


def plugin_args(strength: float) -> dict[str, Any] | None:
    """abliserve's per-request ablation of direction slot 1 (what its vLLM engine sends)."""
    return ablation_extra_args(1, strength)


def greedy(llm: Any, jobs: Sequence[Job], tokens: int) -> tuple[list[list[int]], float]:
    """Generate ``tokens`` greedy tokens for every job in one stream; (token ids, seconds)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            max_tokens=tokens,
            temperature=0.0,
            ignore_eos=True,
            detokenize=False,
            extra_args=job.extra_args,
        )
        for job in jobs
    ]
    adapters = [job.adapter for job in jobs]
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=job.prompt) for job in jobs],
        params,
        lora_request=adapters if any(adapters) else None,
        use_tqdm=False,
    )
    return [list(output.outputs[0].token_ids) for output in outputs], time.perf_counter() - start


def interleave(ablated: Sequence[Job], baseline: Sequence[Job]) -> list[Job]:
    """Ablated and baseline requests alternating in one stream."""
    return [job for pair in zip(ablated, baseline, strict=True) for job in pair]


@dataclass
class Measured:
    tokens: list[list[int]]
    seconds: list[float]

    def tokens_per_second(self) -> float:
        count = sum(len(row) for row in self.tokens)
        return count / statistics.median(self.seconds)


def measure(llm: Any, configs: dict[str, list[Job]], tokens: int, rounds: int) -> dict:
    """Warm up, then run every configuration ``rounds`` times in rotating order."""
    greedy(llm, next(iter(configs.values())), tokens)
    results = {name: Measured([], []) for name in configs}
    names = list(configs)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            rows, seconds = greedy(llm, configs[name], tokens)
            results[name].tokens = rows
            results[name].seconds.append(seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from abliserve.demo_model import provision_demo_model

    checkpoint = provision_demo_model()
    artifact = load_artifact(DIRECTION)
    prompts = chat_token_ids(AutoTokenizer.from_pretrained(checkpoint), load_prompts(args.prompts))
    baseline = [Job(p) for p in prompts]
    with tempfile.TemporaryDirectory() as folder:
        adapter = Path(folder) / "adapter"
        export_lora(checkpoint, artifact, 1.0, adapter, "refusal")
        lora_jobs = [Job(p, adapter=adapter_request(adapter)) for p in prompts]
        plugin_jobs = [Job(p, extra_args=plugin_args(1.0)) for p in prompts]
        results: dict[str, Measured] = {}
        with offline_vllm(checkpoint) as llm:
            results |= measure(llm, {"plain": baseline}, args.tokens, args.rounds)
        with offline_vllm(checkpoint, lora=True) as llm:
            configs = {
                "lora-adapter": lora_jobs,
                "lora-baseline": baseline,
                "lora-mixed": interleave(lora_jobs, baseline)[: len(prompts)],
            }
            results |= measure(llm, configs, args.tokens, args.rounds)
        with offline_vllm(checkpoint, artifact=artifact) as llm:
            configs = {
                "plugin-1": plugin_jobs,
                "plugin-mixed": interleave(plugin_jobs, baseline)[: len(prompts)],
            }
            results |= measure(llm, configs, args.tokens, args.rounds)
    print(report(results, args))


def report(results: dict[str, Measured], args: argparse.Namespace) -> str:
    """Markdown: throughput per configuration, ratios, token checks."""
    lines = [
        f"{args.prompts} prompts at once, {args.tokens} greedy tokens, median of "
        f"{args.rounds} rounds",
        "",
        "| configuration | output tok/s | rounds (s) |",
        "|---|---|---|",
    ]
    for name, measured in results.items():
        seconds = ", ".join(f"{s:.2f}" for s in measured.seconds)
        lines.append(f"| {name} | {measured.tokens_per_second():.1f} | {seconds} |")
    rate = {name: measured.tokens_per_second() for name, measured in results.items()}
    lines.append("")
    for a, b in [
        ("lora-adapter", "plain"),
        ("plugin-1", "plain"),
        ("lora-adapter", "plugin-1"),
        ("lora-mixed", "plugin-mixed"),
        ("lora-baseline", "plain"),
    ]:
        lines.append(f"- {a} / {b}: **{rate[a] / rate[b]:.3f}x**")
    same_adapter = results["lora-adapter"].tokens == results["plugin-1"].tokens
    same_baseline = results["lora-baseline"].tokens == results["plain"].tokens
    same_mixed = results["lora-mixed"].tokens == results["plugin-mixed"].tokens
    lines.append(
        f"- tokens: adapter = plugin at 1: {same_adapter}; LoRA engine baseline = plain: "
        f"{same_baseline}; mixed streams equal row by row: {same_mixed}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
