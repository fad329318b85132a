"""The transformers engine on a tiny random model: continuous batching with per-row ablation
gives each request exactly what it gets alone (invariant 3), aborts free their rows, stop
tokens and limits end rows, and alpha = 0 is the plain model (invariant 1)."""

from __future__ import annotations

import asyncio
import time

import pytest
import tiny_models
import torch
from server_harness import tiny_direction

from abliserve.directions.artifact import load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    GenerationRequest,
    SamplingOptions,
)
from abliserve.server.engines.kv_batch import KVBatch
from abliserve.server.engines.sampling import make_generator, sample_token
from abliserve.server.engines.transformers_engine import TransformersEngine

PROMPTS = [
    [3, 4, 11, 12, 13, 14, 15, 2, 3, 5],
    [3, 4, 30, 2, 3, 5],
    [3, 4, 20, 21, 22, 2, 3, 5],
    [7, 8, 9],
    [3, 4, 24, 25, 26, 27, 28, 29, 2, 3, 5],
]
SPECS = [
    BASELINE,
    AblationSpec("a", 1.0),
    AblationSpec("b", 0.5),
    AblationSpec("a", 0.5),
    AblationSpec("b", 1.0),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_models.checkpoint(tmp_path_factory.mktemp("tiny") / "model", "qwen2")


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("directions")
    directions = {
        "a": load_artifact(tiny_direction(checkpoint, folder / "a.safetensors", seed=1)),
        "b": load_artifact(tiny_direction(checkpoint, folder / "b.safetensors", seed=2)),
    }
    engine = TransformersEngine(
        checkpoint, checkpoint_identity(checkpoint), directions, max_num_seqs=6
    )
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


def request(i: int, max_tokens: int = 10, **sampling) -> GenerationRequest:
    options = SamplingOptions(
        max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True, **sampling
    )
    return GenerationRequest(
        f"r{i}-{id(options)}", PROMPTS[i % len(PROMPTS)], options, SPECS[i % len(SPECS)]
    )


async def run(engine, req: GenerationRequest, delay_s: float = 0.0):
    await asyncio.sleep(delay_s)
    tokens, logprobs, finish = [], [], None
    async for chunk in engine.generate(req):
        tokens += chunk.token_ids
        logprobs += [item.logprob for item in chunk.logprobs or []]
        finish = chunk.finish_reason
    return tokens, logprobs, finish


def idle(engine, timeout_s: float = 10.0) -> bool:
    """The engine drops finished rows just after streaming their last token: wait for it."""
    deadline = time.monotonic() + timeout_s
    while engine.stats() != {"running": 0.0, "waiting": 0.0}:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_batched_and_joining_requests_equal_solo(engine):
    requests = [request(i, max_tokens=6 + i % 4) for i in range(12)]
    solo = [asyncio.run(run(engine, r)) for r in requests]

    async def together():
        # Half start at once; the rest join the running batch while it decodes, and more
        # requests than max_num_seqs (6) wait for free rows.
        return await asyncio.gather(
            *(run(engine, r, 0.0 if i < 6 else 0.01 * i) for i, r in enumerate(requests))
        )

    batched = asyncio.run(together())
    for alone, shared in zip(solo, batched, strict=True):
        assert shared[0] == alone[0]
        assert shared[2] == alone[2] == "length"
        assert torch.allclose(torch.tensor(shared[1]), torch.tensor(alone[1]), atol=1e-4)
    assert idle(engine)


def test_alpha_zero_is_the_plain_model(engine, checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPTS[0]])
    expected = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=1,
    )
    tokens, _, _ = asyncio.run(run(engine, request(0, max_tokens=8)))
    assert tokens == expected[0, len(PROMPTS[0]) :].tolist()


def test_ablation_changes_the_output(engine):
    baseline = asyncio.run(run(engine, request(0, max_tokens=12)))[0]
    ablated = asyncio.run(
        run(
            engine,
            GenerationRequest(
                "ablated",
                PROMPTS[0],
                SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True),
                AblationSpec("a", 1.0),
            ),
        )
    )[0]
    assert ablated != baseline


def test_abort_frees_the_row_and_spares_the_others(engine):
    keeper = request(1, max_tokens=12)
    alone = asyncio.run(run(engine, keeper))

    async def scenario():
        doomed = GenerationRequest(
            "doomed", PROMPTS[0], SamplingOptions(max_tokens=60, temperature=0, ignore_eos=True)
        )
        stream = engine.generate(doomed)
        first = await anext(stream)
        kept = asyncio.create_task(run(engine, request(1, max_tokens=12)))
        await stream.aclose()  # the consumer leaves: the engine aborts the request
        return first, await kept

    first, kept = asyncio.run(scenario())
    assert len(first.token_ids) == 1
    assert kept[0] == alone[0]
    assert idle(engine)


def test_stop_token_ends_the_row_without_emitting_it(engine):
    tokens, _, _ = asyncio.run(run(engine, request(2, max_tokens=8)))
    stop = tokens[3]
    cut = asyncio.run(run(engine, request(2, max_tokens=8, stop_token_ids=(stop,))))
    assert cut[0] == tokens[: tokens.index(stop)]
    assert cut[2] == "stop"


def test_bad_requests_are_refused_before_they_reach_a_batch(engine):
    options = SamplingOptions(max_tokens=4, temperature=0)
    for bad in (
        GenerationRequest("empty", [], options),
        GenerationRequest("vocab", [3, 10**6], options),
        GenerationRequest("long", [3] * 10, SamplingOptions(max_tokens=10**6)),
        GenerationRequest("direction", [3], options, AblationSpec("nope", 1.0)),
    ):
        with pytest.raises(ValueError):
            asyncio.run(run(engine, bad))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    def sampled(i: int) -> GenerationRequest:
        options = SamplingOptions(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
        return GenerationRequest(f"seeded-{i}", PROMPTS[0], options)

    alone = asyncio.run(run(engine, sampled(0)))[0]

    async def crowd():
        return await asyncio.gather(
            run(engine, sampled(1)), *(run(engine, request(i)) for i in range(4))
        )

    assert asyncio.run(crowd())[0][0] == alone


def test_kv_batch_merge_drop_and_trim():
    from transformers import DynamicCache

    def batch(rows: int, length: int, fill: float) -> KVBatch:
        kv = torch.full((rows, 2, length, 4), fill)
        return KVBatch(
            DynamicCache([(kv.clone(), kv.clone())]), torch.ones(rows, length, dtype=torch.long)
        )

    running = batch(2, 5, 1.0)
    running.append(batch(1, 3, 2.0))
    assert running.mask.tolist()[2] == [0, 0, 1, 1, 1]
    assert running.cache.layers[0].keys[2, :, :2].abs().sum() == 0
    running.keep_rows([2])
    assert running.length == 3 and running.rows == 1  # leading all-padding columns trimmed
    assert running.cache.layers[0].keys.shape == (1, 2, 3, 4)
    assert running.extend_mask().tolist() == [[1, 1, 1, 1]]


def test_sampling_rules():
    logits = torch.tensor([0.0, 3.0, 1.0])
    greedy = SamplingOptions(max_tokens=1, temperature=0)
    assert make_generator(greedy, torch.device("cpu")) is None
    assert sample_token(logits, greedy, None) == 1
    nucleus = SamplingOptions(max_tokens=1, temperature=1.0, top_p=0.01, seed=0)
    assert all(
        sample_token(logits, nucleus, make_generator(nucleus, torch.device("cpu"))) == 1
        for _ in range(5)
    )
    seeded = SamplingOptions(max_tokens=1, temperature=1.0, seed=5)
    draws = [
        sample_token(torch.zeros(1000), seeded, make_generator(seeded, torch.device("cpu")))
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
