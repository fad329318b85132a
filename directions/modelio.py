"""Running a chat model on instruction batches: the plumbing extraction, selection and
evaluation share (loading, chat templating with left padding, first-token scores).

Left padding keeps every prompt's last token at position -1, where the model decides how to
answer; explicit position ids keep padded rows' positions identical to an unpadded run (the
model's default ``arange`` would shift them by the pad length).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from abliserve.architectures import WriterSpec, check_checkpoint
from abliserve.errors import UserError
from abliserve.selfcheck import check_writers

# Arditi et al. score refusal on the first generated token; "I" (I'm sorry / I cannot) and "As"
# (As an AI ...) open nearly every refusal of Qwen and Llama chat models.
DEFAULT_REFUSAL_WORDS = ("I", "As")


def load_model(
    checkpoint: Path, dtype: torch.dtype = torch.float32, writers: WriterSpec | None = None
) -> tuple[nn.Module, object]:
    """Model (eval mode) and tokenizer (left padding) from a local checkpoint folder; its
    residual-stream writers pass the self-check, or this refuses it."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(checkpoint)
    check_checkpoint(checkpoint, writers)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    check_writers(model, writers)
    return model, tokenizer


def load_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer, padding on the left (batches end at the last prompt token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: [batch, tokens], pads at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def chat_batches(
    tokenizer, instructions: Sequence[str], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Chat-templated, left-padded batches with attention mask and position ids."""
    for start in range(0, len(instructions), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in instructions[start : start + batch_size]
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        yield {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "position_ids": position_ids(encoded["attention_mask"]),
        }


@torch.inference_mode()
def first_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities [batch, vocab] (float32) of the first generated token."""
    logits = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def refusal_token_ids(tokenizer, words: Sequence[str] = DEFAULT_REFUSAL_WORDS) -> list[int]:
    """The first token of each refusal-opening word."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if not encoded:
            raise UserError(f"refusal token {word!r} encodes to nothing with this tokenizer")
        ids.append(encoded[0])
    return sorted(set(ids))


def refusal_scores(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds [batch] that the answer opens with a refusal token: log p - log(1 - p)."""
    refusal = torch.logsumexp(logprobs[:, list(token_ids)].double(), dim=-1)
    rest = torch.log1p(-refusal.exp().clamp(max=1 - 1e-12))
    return (refusal - rest).float()


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) [batch] between two rows of log-probabilities."""
    return (reference.exp() * (reference - other)).sum(-1)
