"""``abliserve directions evaluate``: refusal rate and damage of a direction (docs/EVAL.md).

Refusal rate: greedy completions of harmful prompts (e.g. JailbreakBench), judged by the
JailbreakBench marker list (heretic's list as a second opinion; empty output = refusal).
Damage: mean first-token KL(baseline || ablated) on harmless prompts. Generation is batched
through the ablation hooks with left padding, an attention mask and explicit position ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from abliserve.architectures import WriterSpec
from abliserve.bank import DirectionBank
from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.modelio import chat_batches, first_token_logprobs, kl_divergence
from abliserve.hooks import AblationHooks
from abliserve.refusal import MarkerList, is_refusal


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """Greedy continuation [batch, <= max_new_tokens] of a left-padded batch: one prefill, then
    one token per step on the KV cache; finished rows emit ``pad_id``; stops when all finish."""
    stop = torch.tensor(list(stop_ids))
    mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
    output = model(**batch, use_cache=True, logits_to_keep=1)
    token = output.logits[:, -1].argmax(-1, keepdim=True)
    generated, done = [token], torch.isin(token, stop)
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions + 1
        output = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=output.past_key_values,
            use_cache=True,
        )
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        done |= torch.isin(token, stop)
    return torch.cat(generated, dim=1)


@dataclass
class Condition:
    """One evaluated setting: a direction (strength 0 = baseline) at a strength."""

    direction: str
    strength: float
    refusal_rate: float = 0.0
    refusal_rate_heretic: float = 0.0
    kl: float = 0.0
    completions: list[str] = field(default_factory=list)


class Evaluator:
    """Holds the model, prompt batches and baseline first-token distributions."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful: Sequence[str],
        harmless: Sequence[str],
        batch_size: int,
        max_new_tokens: int,
        writers: WriterSpec | None = None,
    ) -> None:
        self.model, self.tokenizer, self.writers = model, tokenizer, writers
        self.harmful = list(chat_batches(tokenizer, harmful, batch_size))
        self.harmless = list(chat_batches(tokenizer, harmless, batch_size))
        self.max_new_tokens = max_new_tokens
        self.stop_ids = sorted(
            {tokenizer.eos_token_id, tokenizer.pad_token_id, *_generation_eos(model)} - {None}
        )
        self.baseline = [first_token_logprobs(model, b) for b in self.harmless]

    def run(self, artifact: DirectionArtifact, name: str, strength: float) -> Condition:
        """Generate and score at ``strength``; strength 0 is the baseline (hooks are no-ops)."""
        condition = Condition(direction=name, strength=strength)
        bank = DirectionBank.from_artifacts({name: artifact}, *artifact.directions.shape)
        with AblationHooks(self.model, bank, self.writers) as hooks:
            for batch in tqdm(self.harmful, desc=f"{name} @ {strength:g}", unit="batch"):
                hooks.set_uniform(1, strength, len(batch["input_ids"]))
                tokens = greedy_generate(
                    self.model,
                    batch,
                    self.max_new_tokens,
                    self.stop_ids,
                    self.tokenizer.pad_token_id,
                )
                condition.completions += self.tokenizer.batch_decode(
                    tokens, skip_special_tokens=True
                )
            kl = []
            for batch, baseline in zip(self.harmless, self.baseline, strict=True):
                hooks.set_uniform(1, strength, len(batch["input_ids"]))
                kl.append(kl_divergence(baseline, first_token_logprobs(self.model, batch)))
        texts = condition.completions
        condition.refusal_rate = sum(is_refusal(t) for t in texts) / len(texts)
        condition.refusal_rate_heretic = sum(
            is_refusal(t, MarkerList.HERETIC) for t in texts
        ) / len(texts)
        condition.kl = float(torch.cat(kl).mean())
        return condition


def _generation_eos(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
