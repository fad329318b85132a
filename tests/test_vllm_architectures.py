"""The vLLM engine ablates other architectures exactly as the transformers engine does: one
engine start per architecture (its own process, ``bench/vllm_architecture_check.py``) on a tiny
random checkpoint, greedy token ids equal and first-token log-probabilities close at strength 0
and 1. One architecture per writer kind: dense, post-norm, sparse MoE, two embedding writers
(the coverage command, docs/ARCHITECTURES.md, checks them all)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from vllm_architecture_check import run_check

pytestmark = [pytest.mark.vllm]

LOGPROB_TOLERANCE = 1e-3


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen3_moe", "gpt2"])
def test_vllm_equals_transformers(name):
    result = run_check(name)
    assert result["runs"], result.get("reason")
    for strength in ("0", "1"):
        assert result[f"tokens_equal_{strength}"], result
        assert result[f"logprob_gap_{strength}"] < LOGPROB_TOLERANCE, result
