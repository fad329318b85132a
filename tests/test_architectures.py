"""Every supported architecture, on tiny random models with random norm gains: the writer rule
ablates exactly (strength 0 is the model, strength 1 leaves no component in any layer's stream,
mixed batches equal solo rows), export equals the hooks where it is exact, and a wrongly named
writer or an unknown architecture is refused."""

from __future__ import annotations

import asyncio
import copy
import functools

import pytest
import tiny_models
import torch

from abliserve.architectures import (
    ArchitectureError,
    WriterSpec,
    check_supported,
    writer_layout,
)
from abliserve.bank import DirectionBank
from abliserve.directions.export import orthogonalise_model
from abliserve.hooks import AblationHooks
from abliserve.selfcheck import check_writers, residual_components

ARCHITECTURES = list(tiny_models.ARCHITECTURE_CONFIGS)
POST_NORM = {"gemma2", "gemma3"}
HIDDEN = 64
SITES = 5  # 2 layers


@functools.cache
def _model(name: str) -> torch.nn.Module:
    return tiny_models.architecture_model(name)


def _ids(batch: int = 3, tokens: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(4, HIDDEN // 2, (batch, tokens), generator=generator)


def _bank() -> DirectionBank:
    """Two directions, different at every site, with uneven site weights."""
    generator = torch.Generator().manual_seed(5)
    directions = [tiny_models.random_directions(SITES, HIDDEN, seed) for seed in (1, 2)]
    weights = [torch.rand(SITES, generator=generator) + 0.5 for _ in range(2)]
    return DirectionBank(
        names=["a", "b"],
        directions=torch.stack([torch.zeros(SITES, HIDDEN), *directions]),
        weights=torch.stack([torch.zeros(SITES), *weights]),
    )


@torch.no_grad()
def _logits(model, ids, slots=None, strengths=None) -> torch.Tensor:
    if slots is None:
        return model(input_ids=ids, use_cache=False).logits
    with AblationHooks(model, _bank()) as hooks:
        hooks.set_rows(torch.tensor(slots), torch.tensor(strengths))
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_strength_zero_is_the_model(name):
    model, ids = _model(name), _ids()
    assert torch.equal(_logits(model, ids, [1, 2, 0], [0.0, 0.0, 0.0]), _logits(model, ids))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_strength_one_leaves_no_component_in_any_layer(name):
    direction = tiny_models.random_directions(1, HIDDEN, seed=7)[0]
    leftover = residual_components(_model(name), direction, 1.0)
    unablated = residual_components(_model(name), direction, 0.0)
    assert float(leftover.max()) <= 1e-5, leftover
    assert float(unablated.min()) > 1e-2  # the probe direction is really there without ablation
    check_writers(_model(name))  # the start-up self-check agrees


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_mixed_batch_rows_equal_solo_runs(name):
    model, ids = _model(name), _ids()
    slots, strengths = [1, 2, 1], [1.0, 0.5, 0.0]
    mixed = _logits(model, ids, slots, strengths)
    for row in range(3):
        solo = _logits(model, ids[row : row + 1], [slots[row]], [strengths[row]])
        torch.testing.assert_close(mixed[row], solo[0], atol=1e-4, rtol=1e-4)  # MoE sums


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in POST_NORM])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_export_equals_hooks(name, alpha):
    model, ids, bank = _model(name), _ids(), _bank()
    baked = copy.deepcopy(model)
    approximate = orthogonalise_model(baked, bank.directions[1], bank.weights[1], alpha)
    assert approximate == []
    hooked = _logits(model, ids, [1, 1, 1], [alpha] * 3)
    torch.testing.assert_close(_logits(baked, ids), hooked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(POST_NORM))
def test_post_norm_export_is_approximate_but_removes_the_direction(name):
    model = _model(name)
    direction = tiny_models.random_directions(1, HIDDEN, seed=7)[0]
    baked = copy.deepcopy(model)
    approximate = orthogonalise_model(
        baked, direction.expand(SITES, -1), torch.ones(SITES), alpha=1.0
    )
    assert approximate and all("post_" in writer for writer in approximate)
    assert float(residual_components(baked, direction, 0.0).max()) <= 1e-5


def test_writer_rule_picks_post_norms_moe_blocks_and_every_embedding():
    def names(name: str) -> list[tuple[str, ...]]:
        return [site.names for site in writer_layout(_model(name)).sites]

    assert names("gemma2")[1:3] == [
        ("model.layers.0.post_attention_layernorm",),
        ("model.layers.0.post_feedforward_layernorm",),
    ]
    assert names("llama")[1:3] == [
        ("model.layers.0.self_attn.o_proj",),
        ("model.layers.0.mlp.down_proj",),
    ]
    assert names("qwen3_moe")[2] == ("model.layers.0.mlp",)
    assert names("gpt2")[0] == ("transformer.wte", "transformer.wpe")


def test_misnamed_writer_is_refused_naming_the_layer():
    before_norm = WriterSpec.parse(
        "embed=model.embed_tokens,attn=model.layers.{i}.self_attn.o_proj,"
        "mlp=model.layers.{i}.mlp.down_proj"
    )
    with pytest.raises(ArchitectureError, match="self-check failed: after decoder layer 0"):
        check_writers(_model("gemma2"), before_norm)
    check_writers(_model("llama"), before_norm)  # right for Llama: accepted


def test_unknown_architecture_is_refused_unless_writers_are_named():
    with pytest.raises(ArchitectureError, match=r"FooForCausalLM is not supported \(supported: L"):
        check_supported(["FooForCausalLM"], None)
    check_supported(["FooForCausalLM"], WriterSpec.parse("embed=e,attn=a.{i},mlp=m.{i}"))
    check_supported(["Gemma2ForCausalLM"], None)
    for bad in ("embed=e,attn=a", "embed=e,attn=a.{i},mlp=m", "x=1,attn=a.{i},mlp=m.{i}"):
        with pytest.raises(ArchitectureError, match="--writers"):
            WriterSpec.parse(bad)


ENGINE_PROMPTS = [[5, 9, 12, 7, 20], [3, 11, 8], [14, 14, 6, 25, 30, 10, 4]]
ENGINE_ROWS = [("a", 1.0), (None, 0.0), ("b", 0.5)]


@torch.no_grad()
def _greedy(model, prompt: list[int], slot: int, strength: float, tokens: int) -> list[int]:
    """Reference decoding: the whole sequence recomputed each step, no cache, one row."""
    ids, out = torch.tensor([prompt]), []
    with AblationHooks(model, _bank()) as hooks:
        hooks.set_uniform(slot, strength, 1)
        for _ in range(tokens):
            out.append(int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transformers_engine_serves_every_architecture(name, tmp_path):
    """Continuous batching (left padding, merged caches; sliding-window models capped at their
    window) with mixed strengths gives each row the tokens of a cache-free solo run."""
    from abliserve.directions.artifact import DirectionArtifact
    from abliserve.directions.identity import checkpoint_identity
    from abliserve.server.engines.base import AblationSpec, GenerationRequest, SamplingOptions
    from abliserve.server.engines.transformers_engine import TransformersEngine

    folder = tmp_path / name
    _model(name).save_pretrained(folder)
    identity = checkpoint_identity(folder)
    bank = _bank()
    artifacts = {
        slot_name: DirectionArtifact(bank.directions[slot], bank.weights[slot], identity)
        for slot, slot_name in enumerate(bank.names, start=1)
    }
    engine = TransformersEngine(folder, identity, artifacts, max_num_seqs=3)

    async def generate(index: int) -> list[int]:
        direction, strength = ENGINE_ROWS[index]
        options = SamplingOptions(max_tokens=5, temperature=0, logprobs=0, ignore_eos=True)
        request = GenerationRequest(
            f"r{index}", ENGINE_PROMPTS[index], options, AblationSpec(direction, strength)
        )
        return [token async for chunk in engine.generate(request) for token in chunk.token_ids]

    async def serve() -> list[list[int]]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(generate(i) for i in range(3))))
        finally:
            await engine.shutdown()

    served = asyncio.run(serve())
    for index, (direction, strength) in enumerate(ENGINE_ROWS):
        slot = 0 if direction is None else bank.names.index(direction) + 1
        assert served[index] == _greedy(_model(name), ENGINE_PROMPTS[index], slot, strength, 5)


def test_transformers_engine_refuses_to_start_on_misnamed_writers(tmp_path):
    from abliserve.directions.identity import checkpoint_identity
    from abliserve.server.engines.transformers_engine import TransformersEngine

    folder = tmp_path / "gemma2"
    _model("gemma2").save_pretrained(folder)
    before_norms = WriterSpec.parse(
        "embed=model.embed_tokens,attn=model.layers.{i}.self_attn.o_proj,"
        "mlp=model.layers.{i}.mlp.down_proj"
    )
    engine = TransformersEngine(folder, checkpoint_identity(folder), {}, writers=before_norms)
    with pytest.raises(ArchitectureError, match="after decoder layer 0"):
        asyncio.run(engine.start())
