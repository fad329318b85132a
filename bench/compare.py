"""abliserve against what users would run instead, side by side in one run.

    .venv/bin/python bench/compare.py                    # everything; writes bench/RESULTS.md
    .venv/bin/python bench/compare.py --blocks vllm --rounds 1 --tokens 8   # a quick look

Configurations (the demo model, float32 everywhere so tokens can be compared exactly):

  (a) tutorial   BASELINE: transformers ``generate`` with Python forward hooks that project the
                 direction out, one static left-padded batch of the concurrent requests
                 (``bench/tutorial_baseline.py``)
  hf-engine      abliserve's transformers engine at alpha 1, driven in-process (no HTTP)
  vllm-0/1/mixed abliserve's vLLM engine (in-process AsyncLLM) at alpha 0, alpha 1, and half
                 the requests at 1 and half at 0
  (b) baked      plain vLLM (plugin not loaded) serving ``abliserve export`` at alpha 1
  (c) plain      plain vLLM on the original weights

Each engine is a *block*, run in its own child process (so its peak RSS, children included,
is its own; one model process at a time). A block starts its engine once, warms it up, then
runs ``--rounds`` rounds; each round runs every configuration of the block once, in rotating
order, at 1, 8 and 32 concurrent requests (greedy, JailbreakBench prompts pinned by hash,
exactly ``--tokens`` output tokens). ``--passes 2`` runs the blocks again in reverse order so
drift between blocks cancels too. Printed: medians over rounds with [min-max], and for each
configuration that must reproduce another's tokens, the agreement and ``ok``/``WRONG``.
The vLLM block also measures throughput against prompt length (``--scaling-lengths``) and the
run ends with a profile of the ablation op for one decode step; ``bench/scaling.png`` plots
both scalings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loadgen import (
    BENCH,
    DIRECTION,
    PROMPT_FILE,
    PROMPT_SHA256,
    PeakRss,
    baked_checkpoint,
    baked_path,
    chat_token_ids,
    environment,
    load_prompts,
    run_concurrent,
)
from stats import (
    Agreement,
    RequestTrace,
    RunMetrics,
    agreement,
    over_rounds,
    run_metrics,
    verdict,
)

from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    GenerationRequest,
    SamplingOptions,
)

LEVELS = (1, 8, 32)
ON = AblationSpec("refusal", 1.0)
OFF = AblationSpec("refusal", 0.0)
RESULTS_MD = BENCH / "RESULTS.md"
RAW_JSON = BENCH / "compare-results.json"
PLOT = BENCH / "scaling.png"
BEGIN, END = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    block: str
    mix: tuple[AblationSpec, ...]  # request i is sent with mix[i % len(mix)]
    baked: bool = False  # the weights themselves are ablated

    def spec(self, index: int) -> AblationSpec:
        return self.mix[index % len(self.mix)]

    def ablates(self, index: int) -> bool:
        return self.baked or self.spec(index).active


CONFIGS = (
    Config("tutorial", "(a) tutorial hooks + generate, static batch [BASELINE]", "tutorial", (ON,)),
    Config("hf-engine", "abliserve transformers engine a=1", "transformers", (ON,)),
    Config("vllm-0", "abliserve vLLM a=0", "vllm", (OFF,)),
    Config("vllm-1", "abliserve vLLM a=1", "vllm", (ON,)),
    Config("vllm-mixed", "abliserve vLLM 50/50 a=1/a=0", "vllm", (ON, OFF)),
    Config("baked", "(b) plain vLLM, baked a=1 checkpoint", "vllm-baked", (BASELINE,), True),
    Config("plain", "(c) plain vLLM, original weights", "vllm-plain", (BASELINE,)),
)
BY_KEY = {config.key: config for config in CONFIGS}
BLOCKS = ("vllm", "vllm-baked", "vllm-plain", "tutorial", "transformers")  # vLLM ones adjacent


def rotated(items: Sequence, shift: int) -> list:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def request_count(level: int, solo_requests: int) -> int:
    return solo_requests if level == 1 else level


# -- inside a block (child process) ---------------------------------------------------------


@dataclass
class BlockResult:
    """What a block hands back: metrics[config][level] = one dict per round, the tokens of
    the first round's 32-request run keyed by prompt index, and the scaling runs."""

    metrics: dict[str, dict[str, list[dict]]]
    tokens: dict[str, dict[str, list[int]]]
    scaling: list[dict]


def record(result: BlockResult, key: str, level: int, round_: int, wall, traces) -> None:
    metrics = run_metrics(wall, traces)
    result.metrics.setdefault(key, {}).setdefault(str(level), []).append(asdict(metrics))
    if round_ == 0 and level == max(LEVELS):
        result.tokens[key] = {str(i): list(trace.token_ids) for i, trace in enumerate(traces)}
    print(
        f"  round {round_} {key:<10} x{level:<3} {metrics.tokens_per_s:8.1f} tok/s  "
        f"TTFT p50 {1000 * metrics.ttft_p50:7.0f} ms  ITL p50 {1000 * metrics.itl_p50:6.0f} ms",
        flush=True,
    )


def requests_for(config: Config, prompts, level: int, count: int, tokens: int, tag: str):
    options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [
        GenerationRequest(f"{tag}-{config.key}-{level}-{i}", prompts[i], options, config.spec(i))
        for i in range(count)
    ]


async def engine_block(engine, configs: list[Config], prompts, args) -> BlockResult:
    result = BlockResult({}, {}, [])
    await engine.start()
    try:
        for config in configs:  # warm every path (the ablation op too) before timing
            warm = requests_for(config, prompts, max(LEVELS), max(LEVELS), 4, "warm")
            await run_concurrent(engine, warm, max(LEVELS))
        for round_ in range(args.rounds):
            for config in rotated(configs, round_):
                for level in LEVELS:
                    count = request_count(level, args.solo_requests)
                    tag = f"r{round_}"
                    jobs = requests_for(config, prompts, level, count, args.tokens, tag)
                    wall, traces = await run_concurrent(engine, jobs, level)
                    record(result, config.key, level, round_, wall, traces)
        if args.scaling_lengths and "vllm-1" in {c.key for c in configs}:
            result.scaling = await scaling_runs(engine, prompts, args)
    finally:
        await engine.shutdown()
    return result


def prompt_of_length(prompts: list[list[int]], length: int, index: int) -> list[int]:
    """A chat prompt of exactly ``length`` tokens: several goals' tokens as the user turn, cut
    to fit, with the template's closing tokens (the common suffix of all prompts) kept."""
    suffix = 0
    while all(p[-suffix - 1] == prompts[0][-suffix - 1] for p in prompts):
        suffix += 1
    body: list[int] = []
    i = index
    while len(body) < length:
        body += prompts[i % len(prompts)][:-suffix]
        i += 1
    return body[: length - suffix] + prompts[0][-suffix:]


async def scaling_runs(engine, prompts, args) -> list[dict]:
    """Output tokens/s against prompt length at ``--scaling-concurrency``, alpha 0 vs 1."""
    configs = [BY_KEY["vllm-0"], BY_KEY["vllm-1"]]
    level = args.scaling_concurrency
    runs = []
    for length in args.scaling_lengths:
        long_prompts = [prompt_of_length(prompts, length, i) for i in range(level)]
        for round_ in range(args.rounds):
            for config in rotated(configs, round_):
                tag = f"s{length}-r{round_}"
                jobs = requests_for(config, long_prompts, level, level, args.scaling_tokens, tag)
                wall, traces = await run_concurrent(engine, jobs, level)
                metrics = run_metrics(wall, traces)
                runs.append({"config": config.key, "length": length, **asdict(metrics)})
                print(
                    f"  scaling {config.key} prompt {length}: {metrics.tokens_per_s:.1f} tok/s",
                    flush=True,
                )
    return runs


def tutorial_block(checkpoint: Path, artifact, prompts, args) -> BlockResult:
    import torch
    from tutorial_baseline import add_ablation_hooks, generate_batch, load

    model, tokenizer = load(checkpoint, getattr(torch, args.dtype))
    add_ablation_hooks(model, artifact.directions, artifact.weights, alpha=1.0)
    generate_batch(model, tokenizer, prompts[:2], 4)  # warm-up
    result = BlockResult({}, {}, [])
    for round_ in range(args.rounds):
        for level in LEVELS:
            count = request_count(level, args.solo_requests)
            start = time.perf_counter()
            traces: list[RequestTrace] = []
            for first in range(0, count, level):
                batch = prompts[first : min(first + level, count)]
                traces += generate_batch(model, tokenizer, batch, args.tokens)
            record(result, "tutorial", level, round_, time.perf_counter() - start, traces)
    return result


def run_block(name: str, args) -> BlockResult:
    """Build the block's engine, measure its configurations, return the results."""
    import torch
    from transformers import AutoTokenizer

    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.identity import checkpoint_identity
    from abliserve.models import resolve_model

    torch.manual_seed(0)
    checkpoint = resolve_model(args.model)
    artifact = load_artifact(args.direction)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = chat_token_ids(tokenizer, load_prompts(max(LEVELS)))
    if name == "export":
        baked_checkpoint(checkpoint, artifact)
        return BlockResult({}, {}, [])
    if name == "tutorial":
        return tutorial_block(checkpoint, artifact, prompts, args)
    configs = [config for config in CONFIGS if config.block == name]
    if name == "transformers":
        from abliserve.server.engines.transformers_engine import TransformersEngine

        engine = TransformersEngine(
            checkpoint,
            checkpoint_identity(checkpoint),
            {"refusal": artifact},
            max_num_seqs=max(LEVELS),
            dtype=args.dtype,
            max_model_len=args.max_model_len,
        )
        return asyncio.run(engine_block(engine, configs, prompts, args))
    from abliserve.server.engines.vllm_engine import VllmEngine

    served = baked_checkpoint(checkpoint, artifact) if name == "vllm-baked" else checkpoint
    directions = {"refusal": artifact} if name == "vllm" else {}
    plugins = {} if name == "vllm" else {"VLLM_PLUGINS": "none"}  # plain: plugin not loaded
    kv_cache = {} if args.kv_cache_gib is None else {"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib}
    with environment(**kv_cache, **plugins):
        engine = VllmEngine(
            served,
            checkpoint_identity(served),
            directions,
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            max_model_len=args.max_model_len,
            max_num_seqs=max(LEVELS),
            enable_prefix_caching=False,  # every round pays its prefill, like fresh traffic
        )
        return asyncio.run(engine_block(engine, configs, prompts, args))


# -- the parent: schedule blocks, check tokens, report -------------------------------------


def exported(args) -> bool:
    """Whether the baked checkpoint is already in the cache (exporting loads the model)."""
    from abliserve.directions.artifact import load_artifact
    from abliserve.models import resolve_model

    return baked_path(resolve_model(args.model), load_artifact(args.direction)).exists()


def wait_for_memory(min_free_gib: float) -> None:
    """The machine is shared: start a model process only when there is room for it."""
    import psutil

    while (available := psutil.virtual_memory().available / 2**30) < min_free_gib:
        print(f"  waiting for memory: {available:.1f} GiB available < {min_free_gib}", flush=True)
        time.sleep(30)


def spawn_block(
    name: str, argv: list[str], min_free_gib: float
) -> tuple[BlockResult, float] | None:
    """Run one block in a child process; (its results, peak RSS of its process tree in GiB),
    or None if it failed (the run goes on without it, and the report says so)."""
    wait_for_memory(min_free_gib)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "block.json"
        command = [sys.executable, __file__, *argv, "--run-block", name, "--block-out", str(out)]
        started = time.perf_counter()
        print(f"block {name}: starting", flush=True)
        process = subprocess.Popen(command)
        with PeakRss(process.pid) as peak:
            code = process.wait()
        if code != 0:
            print(f"block {name} FAILED with exit code {code}", flush=True)
            return None
        print(f"block {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
        return BlockResult(**json.loads(out.read_text())), peak.peak_bytes / 2**30


def merge(into: BlockResult, other: BlockResult) -> None:
    for key, levels in other.metrics.items():
        for level, rounds in levels.items():
            into.metrics.setdefault(key, {}).setdefault(level, []).extend(rounds)
    for key, tokens in other.tokens.items():
        into.tokens.setdefault(key, tokens)
    into.scaling.extend(other.scaling)


@dataclass(frozen=True)
class Check:
    """Config ``key`` must reproduce ``reference`` on its rows at alpha 1 (and ``unablated`` on
    rows at alpha 0); ablated rows must differ from ``unablated``."""

    key: str
    reference: str | None
    unablated: str | None


CHECKS = (
    Check("hf-engine", "tutorial", None),
    Check("vllm-0", None, "plain"),
    Check("vllm-1", "baked", "plain"),
    Check("vllm-mixed", "baked", "plain"),
    Check("baked", None, "plain"),
)


def check_tokens(tokens: dict[str, dict[str, list[int]]]) -> dict[str, str]:
    """The agreement line of every checked configuration, with its verdict."""
    lines = {}
    for check in CHECKS:
        if check.key not in tokens:
            continue
        config = BY_KEY[check.key]
        rows = {int(i): t for i, t in tokens[check.key].items()}
        ablated = {i: t for i, t in rows.items() if config.ablates(i)}
        plain_rows = {i: t for i, t in rows.items() if i not in ablated}
        expected: dict[int, list[int]] = {}
        if check.reference in tokens:
            expected |= {int(i): t for i, t in tokens[check.reference].items() if int(i) in ablated}
        unablated = None
        if check.unablated in tokens:
            base = {int(i): t for i, t in tokens[check.unablated].items()}
            expected |= {i: base[i] for i in plain_rows if i in base}
            if ablated:
                unablated = agreement(ablated, base)
        match: Agreement | None = agreement(rows, expected) if expected else None
        parts = []
        if match is not None:
            references = "/".join(r for r in (check.reference, check.unablated) if r)
            parts.append(f"vs {references}: {match.describe()}")
        if unablated is not None:
            parts.append(f"ablated rows vs {check.unablated}: {unablated.identical} identical")
        outcome = verdict(match, unablated) if parts else "unchecked (reference not run)"
        lines[check.key] = f"{outcome} ({'; '.join(parts)})" if parts else outcome
    return lines


def fmt_ms(values: list[float]) -> str:
    return f"{1000 * over_rounds(values).median:.0f}"


def table(result: BlockResult, peaks: dict[str, float], verdicts: dict[str, str]) -> str:
    lines = [
        "| configuration | conc | output tok/s median [min-max] | TTFT p50 ms | TTFT p95 ms "
        "| ITL p50 ms | ITL p95 ms | peak RSS GiB | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for config in CONFIGS:
        if config.key not in result.metrics:
            continue
        status = verdicts.get(config.key, "reference").split(" ")[0]
        label = f"**WRONG** {config.label}" if status == "WRONG" else config.label
        for level in LEVELS:
            rounds = result.metrics[config.key].get(str(level), [])
            if not rounds:
                continue
            series = {name: [r[name] for r in rounds] for name in RunMetrics.FIELDS}
            speed = over_rounds(series["tokens_per_s"])
            lines.append(
                f"| {label} | {level} | {speed.median:.1f} [{speed.low:.1f}-{speed.high:.1f}] "
                f"| {fmt_ms(series['ttft_p50'])} | {fmt_ms(series['ttft_p95'])} "
                f"| {fmt_ms(series['itl_p50'])} | {fmt_ms(series['itl_p95'])} "
                f"| {peaks.get(config.block, float('nan')):.2f} | {status} |"
            )
    return "\n".join(lines)


RATIOS = (
    ("abliserve vLLM a=1 vs (a) tutorial", "vllm-1", "tutorial", (32,)),
    ("abliserve vLLM a=1 vs (b) baked", "vllm-1", "baked", LEVELS),
    ("abliserve vLLM 50/50 vs (c) plain", "vllm-mixed", "plain", LEVELS),
    ("abliserve vLLM a=0 vs (c) plain", "vllm-0", "plain", LEVELS),
    ("abliserve vLLM a=1 vs a=0 (same engine)", "vllm-1", "vllm-0", LEVELS),
    ("abliserve transformers engine vs (a) tutorial", "hf-engine", "tutorial", LEVELS),
)


def ratios(result: BlockResult, verdicts: dict[str, str]) -> list[str]:
    """Throughput ratios of medians; a WRONG side makes the ratio meaningless."""
    lines = []
    for title, key, base, levels in RATIOS:
        if key not in result.metrics or base not in result.metrics:
            continue
        parts = []
        for level in levels:
            a = result.metrics[key].get(str(level))
            b = result.metrics[base].get(str(level))
            if not a or not b:
                continue
            if any(verdicts.get(k, "").startswith("WRONG") for k in (key, base)):
                parts.append(f"x{level}: n/a (WRONG)")
                continue
            top = over_rounds([r["tokens_per_s"] for r in a]).median
            bottom = over_rounds([r["tokens_per_s"] for r in b]).median
            parts.append(f"x{level}: {top / bottom:.3f}")
        lines.append(f"- {title}: {', '.join(parts)}")
    return lines


def plot(result: BlockResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("vllm-0", "vllm-1", "vllm-mixed", "baked", "plain"):
        if key in result.metrics:
            speeds = [
                over_rounds([r["tokens_per_s"] for r in result.metrics[key][str(level)]]).median
                for level in LEVELS
            ]
            left.plot(LEVELS, speeds, marker="o", label=BY_KEY[key].label)
    left.set(xscale="log", xticks=LEVELS, xticklabels=[str(level) for level in LEVELS])
    left.set(xlabel="concurrent requests", ylabel="output tokens/s", title="vs concurrency")
    left.legend(fontsize=7)
    for key in ("vllm-0", "vllm-1"):
        runs = [run for run in result.scaling if run["config"] == key]
        lengths = sorted({run["length"] for run in runs})
        speeds = [
            over_rounds([r["tokens_per_s"] for r in runs if r["length"] == length]).median
            for length in lengths
        ]
        if lengths:
            right.plot(lengths, speeds, marker="o", label=BY_KEY[key].label)
    right.set(xlabel="prompt tokens", ylabel="output tokens/s", title="vs prompt length")
    right.legend(fontsize=7)
    figure.suptitle("abliserve vLLM engine, demo model, CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def scaling_table(result: BlockResult, concurrency: int) -> str:
    if not result.scaling:
        return ""
    lines = [
        f"| prompt tokens ({concurrency} concurrent) | a=0 tok/s | a=1 tok/s | a=1/a=0 "
        "| a=0 TTFT p50 ms | a=1 TTFT p50 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length in sorted({run["length"] for run in result.scaling}):

        def median(key: str, field: str, length=length) -> float:
            values = [
                r[field] for r in result.scaling if r["config"] == key and r["length"] == length
            ]
            return over_rounds(values).median

        off, on = median("vllm-0", "tokens_per_s"), median("vllm-1", "tokens_per_s")
        lines.append(
            f"| {length} | {off:.1f} | {on:.1f} | {on / off:.3f} "
            f"| {1000 * median('vllm-0', 'ttft_p50'):.0f} "
            f"| {1000 * median('vllm-1', 'ttft_p50'):.0f} |"
        )
    return "\n".join(lines)


def profile_section(result: BlockResult, model: str, dtype_name: str) -> str:
    """The ablation op's time for one 32-request decode step, and its share of the measured
    inter-token latency of the alpha 1 run."""
    import torch
    from op_profile import profile_one_step

    from abliserve.directions.identity import checkpoint_identity
    from abliserve.models import resolve_model

    identity = checkpoint_identity(resolve_model(model))
    sites = 2 * identity.num_layers + 1
    dtype = getattr(torch, dtype_name)
    per_step_ms, profile = profile_one_step(identity.hidden_size, sites, max(LEVELS), dtype)
    text = f"Ablation op alone, {sites} sites x [{max(LEVELS)}, {identity.hidden_size}] {dtype}: "
    text += f"{per_step_ms:.2f} ms per decode step"
    rounds = result.metrics.get("vllm-1", {}).get(str(max(LEVELS)))
    if rounds:
        itl = over_rounds([r["itl_p50"] for r in rounds]).median
        text += f" = {100 * per_step_ms / (1000 * itl):.1f}% of the measured a=1 ITL p50"
        text += f" ({1000 * itl:.0f} ms) at {max(LEVELS)} concurrent"
    return f"{text}.\n\n```\n{profile}```"


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Architecture", "Model name", "CPU(s):", "Thread(s) per core", "Flags")
    lines = [
        line
        if not line.startswith("Flags")
        else "Flags (AVX-512/AMX): "
        + " ".join(flag for flag in line.split() if flag.startswith(("avx512", "amx")))
        for line in lscpu.splitlines()
        if line.startswith(keep)
    ]
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout
    return "\n".join(lines) + "\n" + free.rstrip()


def write_results(section: str) -> None:
    """Replace the generated section of RESULTS.md, keeping any hand-written text around it."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)


def report(result: BlockResult, peaks: dict[str, float], args, argv: list[str], failed) -> str:
    verdicts = check_tokens(result.tokens)
    command = " ".join([".venv/bin/python bench/compare.py", *argv])
    checks = [f"- {key}: {line}" for key, line in verdicts.items()]
    scaling = scaling_table(result, args.scaling_concurrency)
    mode = "eager" if args.enforce_eager else "compiled"
    return "\n\n".join(
        part
        for part in (
            f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"Command: `{command}`",
            f"Machine (shared with other jobs while it ran):\n\n```\n{machine()}\n```",
            f"Settings: {args.dtype}, vLLM {mode}, {args.tokens} output tokens per request "
            f"(EOS ignored), greedy, {args.rounds} round(s) x {args.passes} pass(es), "
            f"{args.solo_requests} sequential requests at concurrency 1, prompts: first 32 goals "
            f"of `{PROMPT_FILE.relative_to(BENCH.parent)}` (sha256 {PROMPT_SHA256[:16]}...), "
            "chat template applied; prefix caching off. Medians over rounds, [min-max] for "
            "throughput; peak RSS is the block's process tree (the vLLM rows share one engine).",
            table(result, peaks, verdicts),
            "Token agreement (float32, first round at 32 concurrent, per prompt):\n\n"
            + "\n".join(checks),
            "Throughput ratios (medians):\n\n" + "\n".join(ratios(result, verdicts)),
            scaling,
            profile_section(result, args.model, args.dtype) if "vllm-1" in result.metrics else "",
            f"Blocks that failed (see the log): {', '.join(failed)}" if failed else "",
        )
        if part
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="checkpoint (default: the demo model)")
    parser.add_argument("--direction", type=Path, default=DIRECTION, help="direction artifact")
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="engines to run, in order")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per block and pass")
    parser.add_argument("--passes", type=int, default=1, help="2: blocks again, reversed")
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--solo-requests", type=int, default=2, help="requests at concurrency 1")
    parser.add_argument("--dtype", default="float32", help="every engine's dtype")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compiling")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--kv-cache-gib",
        help="VLLM_CPU_KVCACHE_SPACE (GiB); default: sized to the machine, as the server does",
    )
    parser.add_argument(
        "--scaling-lengths",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=[32, 128, 256],
        help="prompt lengths for the scaling runs ('' to skip)",
    )
    parser.add_argument("--scaling-concurrency", type=int, default=4)
    parser.add_argument("--scaling-tokens", type=int, default=8)
    parser.add_argument("--min-free-gib", type=float, default=7.0, help="wait for this much RAM")
    parser.add_argument("--resume", action="store_true", help="add to the last run's blocks")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--run-block", help=argparse.SUPPRESS)
    parser.add_argument("--block-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_block:
        result = run_block(args.run_block, args)
        Path(args.block_out).write_text(json.dumps(asdict(result)))
        return

    argv = sys.argv[1:]
    blocks = [name for name in args.blocks.split(",") if name]
    unknown = set(blocks) - set(BLOCKS)
    if unknown:
        parser.error(f"unknown blocks {sorted(unknown)}; choose from {', '.join(BLOCKS)}")
    if "vllm-baked" in blocks and not exported(args):
        spawn_block("export", argv, args.min_free_gib)
    result = BlockResult({}, {}, [])
    peaks: dict[str, float] = {}
    failed: list[str] = []
    if args.resume and RAW_JSON.exists():  # blocks of an earlier run that was cut short
        saved = json.loads(RAW_JSON.read_text())
        merge(result, BlockResult(**saved["result"]))
        peaks.update(saved["peaks_gib"])
    for pass_ in range(args.passes):
        for name in blocks if pass_ % 2 == 0 else blocks[::-1]:
            outcome = spawn_block(name, argv, args.min_free_gib)
            if outcome is None:
                failed.append(name)
                continue
            merge(result, outcome[0])
            peaks[name] = max(peaks.get(name, 0.0), outcome[1])
            if not args.no_write:  # after every block, so a cut-short run keeps what it has
                publish(result, peaks, failed, args, argv)
    print("\n" + report(result, peaks, args, argv, failed))
    if not args.no_write and not blocks:  # --resume with no blocks: just re-render
        publish(result, peaks, failed, args, argv)


def publish(result: BlockResult, peaks, failed, args, argv) -> None:
    """Write RESULTS.md's generated section, the raw JSON and the scaling plot."""
    RAW_JSON.write_text(json.dumps({"result": asdict(result), "peaks_gib": peaks}, indent=1))
    write_results(report(result, peaks, args, argv, failed))
    if "vllm-1" in result.metrics:
        plot(result, PLOT)


if __name__ == "__main__":
    main()
