"""What leaving the embedding writer out of a LoRA adapter costs, on the demo model.

Some engines cannot load a LoRA on the embedding (vLLM 0.32 for Qwen2), so ``abliserve export
--format lora --no-embedding`` leaves that writer out. The bundled demo direction removes nothing
at the embedding (per layer, residual 0 at the last prompt token is a template-fixed token's
embedding, so its direction is zero), so its adapter never has an embedding part and is exact
everywhere. For a direction that does ablate the embedding (the layer-14 direction bundled until
2026-12-06, ``directions/results/compute-l14.safetensors``, at weight 1 on every writer: Arditi
et al.'s setting), this compares the full ablation with the ablation minus the embedding writer
(what the adapter without it computes; the tests prove the adapter equals those hooks through
PEFT): first-token KL(full || without) on harmless and harmful prompts, greedy token agreement
on harmful prompts, and refusal rates.

    flock /tmp/abliserve-heavy.lock .venv/bin/python bench/lora_embedding_effect.py
"""

from __future__ import annotations

import argparse
import json

import torch
from loadgen import BENCH, REPO, load_prompts

from abliserve.bank import DirectionBank
from abliserve.datasets import load_instructions
from abliserve.demo_model import provision_demo_model
from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.directions.evaluate import greedy_generate
from abliserve.directions.modelio import (
    chat_batches,
    first_token_logprobs,
    kl_divergence,
    load_model,
)
from abliserve.hooks import AblationHooks
from abliserve.refusal import is_refusal

FULL, WITHOUT_EMBEDDING = 1, 2  # bank slots
DIRECTION = REPO / "directions/results/compute-l14.safetensors"


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return min(len(a), len(b))


def variants() -> dict[str, DirectionArtifact]:
    """The layer-14 direction on every writer at weight 1, with and without the embedding."""
    l14 = load_artifact(DIRECTION)
    weights = torch.ones(l14.num_sites)
    without = weights.clone()
    without[0] = 0.0
    return {
        name: DirectionArtifact(directions=l14.directions, weights=w, model=l14.model)
        for name, w in (("full", weights), ("without-embedding", without))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_model(provision_demo_model())
    artifacts = variants()
    bank = DirectionBank.from_artifacts(artifacts, *artifacts["full"].directions.shape)
    harmful = load_prompts(args.prompts)
    harmless = load_instructions(str(BENCH / "data/harmless_test.json"))[: args.prompts]
    stop_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    kl: dict[str, list[torch.Tensor]] = {"harmless": [], "harmful": []}
    tokens: dict[int, list[list[int]]] = {FULL: [], WITHOUT_EMBEDDING: []}
    with AblationHooks(model, bank) as hooks:
        for name, texts in (("harmless", harmless), ("harmful", harmful)):
            for batch in chat_batches(tokenizer, texts, args.batch_size):
                rows = len(batch["input_ids"])
                logprobs = {}
                for slot in (FULL, WITHOUT_EMBEDDING):
                    hooks.set_uniform(slot, args.strength, rows)
                    logprobs[slot] = first_token_logprobs(model, batch)
                    if name == "harmful":
                        generated = greedy_generate(
                            model, batch, args.tokens, stop_ids, tokenizer.pad_token_id
                        )
                        tokens[slot] += generated.tolist()
                kl[name].append(kl_divergence(logprobs[FULL], logprobs[WITHOUT_EMBEDDING]))
    pairs = list(zip(tokens[FULL], tokens[WITHOUT_EMBEDDING], strict=True))
    positions = sum(len(a) for a, _ in pairs)
    texts = {
        slot: tokenizer.batch_decode(rows, skip_special_tokens=True)
        for slot, rows in tokens.items()
    }
    summary = {
        "strength": args.strength,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "first_token_kl_harmless_mean": float(torch.cat(kl["harmless"]).mean()),
        "first_token_kl_harmless_max": float(torch.cat(kl["harmless"]).max()),
        "first_token_kl_harmful_mean": float(torch.cat(kl["harmful"]).mean()),
        "first_token_argmax_agreement": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
        "greedy_identical_prompts": sum(a == b for a, b in pairs) / len(pairs),
        "greedy_common_prefix_fraction": sum(common_prefix(a, b) for a, b in pairs) / positions,
        "refusals_full": sum(map(is_refusal, texts[FULL])) / len(pairs),
        "refusals_without_embedding": sum(map(is_refusal, texts[WITHOUT_EMBEDDING])) / len(pairs),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
