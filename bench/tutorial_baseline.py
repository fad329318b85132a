"""BASELINE (a), the thing abliserve is compared against: the tutorial way of running an
abliterated model.

The widely read abliteration tutorial ("Uncensor any LLM with abliteration") and the
remove-refusals-with-transformers scripts serve an ablated model like this: load it with
transformers, register a Python forward hook on every module that writes to the residual
stream (the embedding, each attention output projection, each MLP down projection) that
subtracts the output's component along the refusal direction, and call ``model.generate``
on a static batch of prompts, left-padded.

Written plainly and fairly, and deliberately without abliserve's code (no direction bank, no
per-row routing, no continuous batching): same model, same dtype as the transformers engine
(float32 on CPU), transformers' default attention, greedy, a fixed number of new tokens, one
``generate`` call per batch of concurrent requests. The projection is the same maths as
abliserve's, so its tokens must equal the transformers engine's at alpha 1 — the benchmark
checks that.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from stats import RequestTrace
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.streamers import BaseStreamer


def writers(model: nn.Module) -> list[nn.Module]:
    """Residual-stream writers in the artifact's site order: embedding, then per layer the
    attention output and MLP output projections (Llama/Qwen2 module names)."""
    decoder = model.model
    modules: list[nn.Module] = [decoder.embed_tokens]
    for layer in decoder.layers:
        modules += [layer.self_attn.o_proj, layer.mlp.down_proj]
    return modules


def add_ablation_hooks(
    model: nn.Module, directions: torch.Tensor, weights: torch.Tensor, alpha: float
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook every writer: ``out - alpha * w * (out . r) r`` with that site's unit direction r
    [hidden] and weight w. Returns the handles so the caller can remove them."""
    handles = []
    for module, direction, weight in zip(writers(model), directions, weights, strict=True):
        scale = alpha * float(weight)
        if scale == 0.0 or not bool(direction.any()):
            continue
        r = direction.to(next(model.parameters()).dtype)

        def hook(module: nn.Module, args: tuple, out: torch.Tensor, r=r, scale=scale):
            return out - scale * (out @ r)[..., None] * r

        handles.append(module.register_forward_hook(hook))
    return handles


def load(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) ready for batched generation: left padding, eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    # Fixed-length outputs: generate would otherwise fill a missing eos_token_id from here.
    model.generation_config.eos_token_id = None
    return model, tokenizer


class StepClock(BaseStreamer):
    """Records when each generation step's tokens exist (``generate`` calls ``put`` once with
    the prompt, then once per step with the batch's new tokens)."""

    def __init__(self) -> None:
        self.seen_prompt = False
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_batch(
    model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int
) -> list[RequestTrace]:
    """One static batch: every prompt left-padded, greedy, exactly ``max_new_tokens`` new
    tokens each (no early stop at end-of-sequence, so every configuration does equal work)."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    clock = StepClock()
    start = time.perf_counter()
    output = model.generate(**batch, generation_config=config, streamer=clock)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    times = tuple(clock.times)
    return [RequestTrace(start, times, tuple(row.tolist())) for row in new_tokens]
