"""The vLLM engine's pieces that need no vLLM engine running: per-token routing, the custom op
(eager and under torch.compile(fullgraph=True)), the writer hooks and the plugin config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.projection import ablate, normalise, site_names
from abliserve.server.engines import vllm_plugin
from abliserve.server.engines.vllm_op import ablate_tokens
from abliserve.server.engines.vllm_routing import (
    TokenRouting,
    ablation_extra_args,
    request_route,
)

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 16


def test_rows_follow_request_order_and_scheduled_tokens():
    routing = TokenRouting(max_tokens=10, num_slots=3, device="cpu")
    # Three requests in input_batch.req_ids order: a 3-token prefill chunk, a decode, a 2-token
    # chunk.
    routing.fill([(1, 1.0), (0, 0.0), (2, 0.5)], np.array([3, 1, 2]))
    assert routing.slots.tolist() == [1, 1, 1, 0, 2, 2, 0, 0, 0, 0]
    assert routing.strengths.tolist() == [1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    # The next step is smaller: rows past it must go back to the no-op (padding rows).
    routing.fill([(2, 0.25), (1, 1.0)], np.array([1, 1]))
    assert routing.slots.tolist() == [2, 1] + [0] * 8
    assert routing.strengths.tolist() == [0.25, 1.0] + [0.0] * 8
    # An all-baseline step clears everything.
    routing.fill([(1, 0.0), (0, 0.0)], np.array([4, 1]))
    assert routing.slots.abs().sum() == 0 and routing.strengths.abs().sum() == 0


def test_routing_buffers_keep_their_storage():
    routing = TokenRouting(max_tokens=8, num_slots=2, device="cpu")
    addresses = (routing.slots.data_ptr(), routing.strengths.data_ptr())
    for counts in ([8], [2, 3], [1]):
        routing.fill([(1, 1.0)] * len(counts), np.array(counts))
    assert (routing.slots.data_ptr(), routing.strengths.data_ptr()) == addresses


def test_routing_rejects_inconsistent_batches():
    routing = TokenRouting(max_tokens=4, num_slots=2, device="cpu")
    with pytest.raises(ValueError, match="exceed"):
        routing.fill([(1, 1.0)], np.array([5]))
    with pytest.raises(ValueError, match="routes"):
        routing.fill([(1, 1.0)], np.array([1, 1]))


def test_extra_args_round_trip_and_malformed_values_fall_back_to_baseline():
    assert ablation_extra_args(0, 1.0) is None
    assert ablation_extra_args(2, 0.0) is None
    assert request_route(ablation_extra_args(2, 0.75), num_slots=3) == (2, 0.75)
    assert request_route(None, 3) == (0, 0.0)
    assert request_route({"other": 1}, 3) == (0, 0.0)
    assert request_route({"abliserve": {"slot": 7, "strength": 1.0}}, 3) == (0, 0.0)
    assert request_route({"abliserve": {"slot": 1, "strength": float("nan")}}, 3) == (0, 0.0)
    assert request_route({"abliserve": {"slot": "x"}}, 3) == (0, 0.0)


def _bank(num_directions: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.zeros(1 + num_directions, HIDDEN)
    directions[1:] = normalise(torch.randn(num_directions, HIDDEN, generator=generator))
    weights = torch.tensor([0.0] + [0.5 + i for i in range(num_directions)])
    return directions, weights


def test_op_ablates_each_row_with_its_own_slot_and_strength():
    directions, weights = _bank()
    out = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([1, 0, 2, 1, 2, 0, 0])  # buffers longer than the batch (padding)
    strengths = torch.tensor([1.0, 1.0, 0.5, 0.0, 2.0, 0.0, 0.0])
    result = ablate_tokens(out, directions, weights, slots, strengths)
    for row in range(5):
        slot = int(slots[row])
        expected = ablate(out[row], directions[slot], float(strengths[row] * weights[slot]))
        torch.testing.assert_close(result[row], expected)
    assert torch.equal(result[1], out[1]) and torch.equal(result[3], out[3])  # no-op rows exact


def test_op_keeps_bfloat16_baseline_rows_bit_exact():
    directions, weights = _bank()
    out = torch.randn(4, HIDDEN).to(torch.bfloat16)
    zeros = torch.zeros(4, dtype=torch.int64), torch.zeros(4)
    assert torch.equal(ablate_tokens(out, directions, weights, *zeros), out)


def test_op_compiles_fullgraph_and_follows_buffer_changes():
    """The CPU side of bench/cuda_graph_check.py: torch.compile(fullgraph=True) traces the op
    through its fake implementation and the compiled code reads the buffers' new values."""
    spec = importlib.util.spec_from_file_location(
        "cuda_graph_check", REPO / "bench/cuda_graph_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.check_compiled("cpu") < module.TOLERANCE


class _RowParallel(nn.Linear):
    """Stands in for vLLM's RowParallelLinear: returns (output, output_bias)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class _TinyVllmModel(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(32, HIDDEN)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.o_proj = _RowParallel(HIDDEN, HIDDEN, bias=False)
            layer.mlp = nn.Module()
            layer.mlp.down_proj = _RowParallel(HIDDEN, HIDDEN, bias=False)
            self.model.layers.append(layer)


def test_writer_hooks_project_each_writer_output_per_token():
    model = _TinyVllmModel(layers=2)
    writers = vllm_plugin.writer_modules(model)
    assert len(writers) == len(site_names(2))
    directions, weights = _bank(1)
    routing = TokenRouting(max_tokens=8, num_slots=2, device="cpu")
    for module in writers:
        module.register_forward_hook(vllm_plugin._writer_hook(directions, weights, routing))
    # Request 0 (two rows) at strength 2 of slot 1, whose weight is 0.5: alpha 1 at every site.
    routing.fill([(1, 2.0), (0, 0.0)], np.array([2, 1]))
    ids = torch.tensor([3, 4, 5])
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        for row in range(3):
            alpha = 1.0 if row < 2 else 0.0
            expected = ablate(model.model.embed_tokens.weight[ids[row]], directions[1], alpha)
            torch.testing.assert_close(embedded[row], expected)
        x = torch.randn(3, HIDDEN)
        output, bias = model.model.layers[1].mlp.down_proj(x)
        assert bias is None
        assert abs(float(output[0] @ directions[1])) < 1e-5  # ablated rows lose the component
        unhooked = x[2] @ model.model.layers[1].mlp.down_proj.weight.T
        torch.testing.assert_close(output[2], unhooked)


def test_writer_modules_names_the_missing_module():
    model = _TinyVllmModel(layers=1)
    del model.model.layers[0].mlp.down_proj
    with pytest.raises(vllm_plugin.PluginError, match="down_proj"):
        vllm_plugin.writer_modules(model)


def _artifact(seed: int) -> DirectionArtifact:
    identity = ModelIdentity("tiny", hidden_size=HIDDEN, num_layers=1, fingerprint="f" * 64)
    generator = torch.Generator().manual_seed(seed)
    directions = normalise(torch.randn(3, HIDDEN, generator=generator))
    return DirectionArtifact(directions=directions, weights=torch.ones(3), model=identity)


def test_plugin_config_is_content_addressed_and_bounded(tmp_path):
    first = vllm_plugin.plugin_config({"a": _artifact(0), "b": _artifact(1)}, tmp_path)
    again = vllm_plugin.plugin_config({"a": _artifact(0), "b": _artifact(1)}, tmp_path)
    assert first == again  # same bank -> same vLLM compile-cache key
    entries = first[vllm_plugin.CONFIG_KEY]["directions"]
    assert [e["name"] for e in entries] == ["a", "b"]
    assert all(Path(e["path"]).is_file() for e in entries)
    other = vllm_plugin.plugin_config({"a": _artifact(2)}, tmp_path)
    assert other[vllm_plugin.CONFIG_KEY]["directions"][0]["sha256"] != entries[0]["sha256"]
    assert first[vllm_plugin.CONFIG_KEY]["capacity"] == 32  # room for directions loaded later
    too_many = {str(i): _artifact(0) for i in range(3)}
    with pytest.raises(vllm_plugin.PluginError, match="at most 2"):
        vllm_plugin.plugin_config(too_many, tmp_path, capacity=2)


def test_runtime_writes_land_in_place_and_compiled_hooks_follow_them(tmp_path):
    """A direction loaded while serving: the worker copies it into a free slot of every site's
    bank tensor in place; the addresses never move, and code compiled before the write reads
    the new values without recompiling (graph-safe, docs/ENGINES.md)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _TinyVllmModel(layers=1)
    config = vllm_plugin.plugin_config({"a": _artifact(0)}, tmp_path, capacity=2)
    text_config = SimpleNamespace(hidden_size=HIDDEN, num_hidden_layers=1)
    runner = SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        model_config=SimpleNamespace(hf_text_config=text_config, model="tiny"),
        get_model=lambda: model,
        device=torch.device("cpu"),
        max_num_tokens=8,
    )
    routing = vllm_plugin.install(runner, config[vllm_plugin.CONFIG_KEY])
    assert routing.num_slots == 3  # capacity + the baseline slot
    bank = runner.abliserve_bank
    addresses = [tensor.data_ptr() for tensor in bank.directions + bank.weights]
    counter = CompileCounterWithBackend("aot_eager")
    embed = torch.compile(lambda ids: model.model.embed_tokens(ids), backend=counter)
    ids = torch.tensor([3, 4, 5])
    routing.fill([(2, 1.0)], np.array([3]))  # slot 2 is still free: zeros, a no-op
    with torch.no_grad():
        torch.testing.assert_close(embed(ids), model.model.embed_tokens.weight[ids])
        late = _artifact(1)
        path = vllm_plugin.stage_artifact(late, tmp_path)
        vllm_plugin.write_slot(SimpleNamespace(model_runner=runner), str(path), 2)
        expected = ablate(model.model.embed_tokens.weight[ids], late.directions[0], 1.0)
        torch.testing.assert_close(embed(ids), expected)
    assert counter.frame_count == 1
    assert [tensor.data_ptr() for tensor in bank.directions + bank.weights] == addresses
    with pytest.raises(vllm_plugin.PluginError, match="outside"):
        vllm_plugin.write_slot(SimpleNamespace(model_runner=runner), str(path), 3)


def test_missing_hook_point_fails_loudly_with_the_tested_versions():
    class MovedRunner:
        def load_model(self) -> None: ...

        def _prepare_inputs(self, scheduler_output) -> None: ...

    with pytest.raises(vllm_plugin.PluginError, match=r"num_scheduled_tokens.*0\.32"):
        vllm_plugin._check_hook_points(MovedRunner)


def test_v2_runner_request_is_refused(monkeypatch):
    monkeypatch.setenv(vllm_plugin.V2_RUNNER_ENV, "1")
    with pytest.raises(vllm_plugin.PluginError, match="V1 runner"):
        vllm_plugin.force_v1_runner()
    monkeypatch.delenv(vllm_plugin.V2_RUNNER_ENV)
    vllm_plugin.force_v1_runner()
    assert vllm_plugin.os.environ[vllm_plugin.V2_RUNNER_ENV] == "0"
