"""The transformers engine honours the sampling controls as the vLLM engine does, on the demo model.

The transformers engine applies logit bias, ``min_tokens``, stop token ids and the repetition,
frequency and presence penalties itself (in vLLM's order); the vLLM engine hands them to vLLM.
Greedy requests using them must get the same text and finish reason from both engines in
float32. The two servers run one after the other (never two models loaded at once).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from reliability_harness import served

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

FLAGS = ["--demo", "--served-model-name", "demo", "--dtype", "float32", "--max-model-len", "1024"]
ASK = [{"role": "user", "content": "Write one short sentence about the sea."}]
BATTERY = {
    "greedy": {},
    "penalties": {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3},
    "logit_bias": {"logit_bias": {"13": 8.0, "576": -100}},
    "min_tokens": {
        "messages": [{"role": "user", "content": "Say just: yes"}],
        "min_tokens": 6,
        "max_tokens": 8,
    },
    "stop_token_ids": {"stop_token_ids": [279, 264]},
    "top_k_one": {"temperature": 1.0, "top_k": 1, "seed": 5},
}


def answers(url: str) -> dict[str, tuple[str, str]]:
    out = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for name, fields in BATTERY.items():
            body = {"model": "demo", "messages": ASK, "temperature": 0, "max_tokens": 16, **fields}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            out[name] = (choice["message"]["content"], choice["finish_reason"])
    return out


def test_transformers_engine_matches_vllm_engine(tmp_path: Path) -> None:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    vllm_flags = ["--engine", "vllm", "--enforce-eager"]
    with served(*FLAGS, *vllm_flags, log_path=tmp_path / "vllm.log", env=env) as server:
        expected = answers(server.url)
    with served(*FLAGS, "--engine", "transformers", log_path=tmp_path / "hf.log") as server:
        got = answers(server.url)
    assert got == expected
    assert expected["greedy"] != expected["penalties"]  # the controls bite
    assert expected["greedy"] != expected["logit_bias"]
