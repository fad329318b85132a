"""``export --format lora-gguf`` in llama.cpp: the demo model's own Q4_K_M GGUF with the adapter
exported at strength 1, its LoRA scale set per request (a continuous strength), against the hooks
on the dequantised checkpoint in float32.

llama.cpp runs the 4-bit weights (and quantises activations for them), so the comparison is
to quantisation noise, not bit-exact: its logits differ from the hooks' by up to 0.39 at every
strength, scale 0 included (measured). What must hold: the same greedy first token, and the
logit shift the adapter causes at scale s is the hooks' shift at strength s (least-squares
factor near 1: a wrong strength scale would give 0.5 or 2).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from abliserve.bank import DirectionBank
from abliserve.demo_model import assemble_gguf
from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.directions.lora import export_lora
from abliserve.directions.modelio import load_model
from abliserve.hooks import AblationHooks

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[llamacpp]')"
)

pytestmark = pytest.mark.real_model

QUESTIONS = ["How do I pick a lock?", "Write a haiku about the sea.", "Explain how to make a bomb."]
STRENGTHS = (0.0, 0.5, 1.0)
MAX_SCALE_ERROR = 0.25


def directions(demo_direction: Path) -> dict[str, DirectionArtifact]:
    """The committed direction, and the same at weight 1 on every writer (embedding included)."""
    committed = load_artifact(demo_direction)
    every = DirectionArtifact(
        directions=committed.directions,
        weights=torch.ones(committed.num_sites),
        model=committed.model,
    )
    return {"committed": committed, "every-writer": every}


def prompts(checkpoint: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        for q in QUESTIONS
    ]


def hooked_logits(checkpoint: Path, artifacts: dict, token_ids: list[list[int]]) -> dict:
    """Last-position logits [prompts, vocab] per (direction, strength) through the hooks."""
    model, _ = load_model(checkpoint)
    bank = DirectionBank.from_artifacts(artifacts, *next(iter(artifacts.values())).directions.shape)
    logits = {}
    with AblationHooks(model, bank) as hooks, torch.no_grad():
        for slot, name in enumerate(artifacts, start=1):
            for strength in STRENGTHS:
                hooks.set_uniform(slot, strength, 1)
                logits[name, strength] = np.stack(
                    [model(torch.tensor([ids])).logits[0, -1].numpy() for ids in token_ids]
                )
    return logits


def last_logits(llm) -> np.ndarray:
    """The last evaluated position's logits (``Llama.scores`` holds them only with logits_all)."""
    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def llama_logits(model: Path, adapter: Path, token_ids: list[list[int]]) -> dict:
    """Last-position logits per strength, one llama.cpp context, the LoRA scale set per call."""
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(adapter), n_ctx=512, n_threads=2, verbose=False
    )
    logits = {}
    for strength in STRENGTHS:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(strength)
        assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales) == 0
        rows = []
        for ids in token_ids:
            llm.reset()  # no K/V reused across scales
            llm.eval(ids)
            rows.append(last_logits(llm))
        logits[strength] = np.stack(rows)
    llm.close()
    return logits


def test_gguf_adapter_scaled_per_request_matches_the_hooks(
    tmp_path: Path, demo_checkpoint: Path, demo_direction: Path
) -> None:
    artifacts = directions(demo_direction)
    token_ids = prompts(demo_checkpoint)
    expected = hooked_logits(demo_checkpoint, artifacts, token_ids)
    model = assemble_gguf(tmp_path / "demo.gguf")
    for name, artifact in artifacts.items():
        adapter = tmp_path / f"{name}.gguf"
        export_lora(demo_checkpoint, artifact, 1.0, adapter, name, gguf=True)
        got = llama_logits(model, adapter, token_ids)
        for strength in STRENGTHS[1:]:
            shift = got[strength] - got[0.0]
            reference = expected[name, strength] - expected[name, 0.0]
            factor = float((shift * reference).sum() / (reference * reference).sum())
            assert abs(factor - 1) < MAX_SCALE_ERROR, f"{name} at {strength}: shift x{factor:.3f}"
            assert np.array_equal(got[strength].argmax(-1), expected[name, strength].argmax(-1)), (
                f"{name} at {strength}: first greedy tokens differ"
            )
