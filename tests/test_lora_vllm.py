"""Stock vLLM serving ``export --format lora`` as a per-request LoRA equals abliserve's vLLM
engine at the same strength, token for token, with baseline requests interleaved in the same
stream equal to plain vLLM (demo model, 32 prompts, greedy).

vLLM 0.32 cannot load an embedding LoRA on Qwen2, so the adapter is exported with the embedding
writer left out (``--no-embedding``) and abliserve runs the same direction with the embedding's
weight set to 0: the comparison stays exact whatever weight the bundled direction gives it.

Three engines start one after another (abliserve's, plain vLLM with LoRA, plain vLLM); the
plain ones never load abliserve's plugin (``VLLM_PLUGINS=none``). The LoRA engine keeps one empty
LoRA slot (``bench_lora.offline_vllm``): without it vLLM 0.32's CPU LoRA ops apply the adapter
to the baseline requests too, and the second test fails.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.directions.lora import export_lora
from abliserve.server.engines.base import AblationSpec

pytest.importorskip("vllm")
from abliserve.server.engines.vllm_engine import VllmEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_lora import Job, adapter_request, greedy, interleave, offline_vllm
from loadgen import chat_token_ids, environment, load_prompts
from test_vllm_engine import ENGINE_OPTIONS, TOKENS, LoopThread, generate_all, running

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

ALPHA = 0.75
PROMPTS = 32


def without_embedding(artifact: DirectionArtifact) -> DirectionArtifact:
    """The artifact with its embedding site (site 0) left alone, as ``--no-embedding`` exports
    it."""
    weights = artifact.weights.clone()
    weights[0] = 0.0
    return replace(artifact, weights=weights)


@pytest.fixture(scope="module")
def runs(demo_checkpoint: Path, demo_direction: Path, tmp_path_factory) -> dict:
    """Token ids of every run, computed once: the engines are the expensive part."""
    artifact = without_embedding(load_artifact(demo_direction))
    adapter = tmp_path_factory.mktemp("lora") / "ablated"
    export_lora(demo_checkpoint, artifact, ALPHA, adapter, "refusal", include_embedding=False)
    tokenizer = AutoTokenizer.from_pretrained(demo_checkpoint)
    prompts = chat_token_ids(tokenizer, load_prompts(PROMPTS))
    runs: dict = {}
    loop = LoopThread()
    try:
        with environment(VLLM_CPU_KVCACHE_SPACE="1"):
            identity = checkpoint_identity(demo_checkpoint)
            engine = VllmEngine(demo_checkpoint, identity, {"refusal": artifact}, **ENGINE_OPTIONS)
            with running(loop, engine):
                spec = AblationSpec("refusal", ALPHA)
                runs["abliserve"] = generate_all(loop, engine, [(p, spec) for p in prompts], "a")
    finally:
        loop.close()
    baseline = [Job(p) for p in prompts]
    ablated = [Job(p, adapter=adapter_request(adapter)) for p in prompts]
    with offline_vllm(demo_checkpoint, lora=True, prefix_caching=True) as llm:
        stream, _ = greedy(llm, interleave(ablated, baseline), TOKENS)
    runs["adapter"], runs["lora-baseline"] = stream[0::2], stream[1::2]
    with offline_vllm(demo_checkpoint, prefix_caching=True) as llm:
        runs["plain"], _ = greedy(llm, baseline, TOKENS)
    return runs


def test_adapter_on_stock_vllm_equals_abliserve(runs: dict) -> None:
    assert len(runs["adapter"]) == PROMPTS
    for i, (ours, adapter) in enumerate(zip(runs["abliserve"], runs["adapter"], strict=True)):
        assert adapter == ours, f"prompt {i}: the adapter differs from abliserve at {ALPHA}"
    # The check can fail: the ablation changes most greedy answers to these harmful prompts.
    changed = sum(a != b for a, b in zip(runs["adapter"], runs["plain"], strict=True))
    assert changed >= PROMPTS // 4, f"only {changed} answers changed"


def test_baseline_requests_beside_the_adapter_equal_plain_vllm(runs: dict) -> None:
    assert runs["lora-baseline"] == runs["plain"]
    assert all(len(tokens) == TOKENS for tokens in runs["plain"])
