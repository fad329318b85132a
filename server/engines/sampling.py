"""Choosing the next token of one batch row: a pure function of that row's logits.

Each row samples on its own (its own temperature, top-p and random generator), so a request's
tokens do not depend on which other requests share its batch: greedy rows take the arg-max, and
a seeded request draws from its own ``torch.Generator`` exactly as it would alone.
"""

from __future__ import annotations

import secrets

import torch

from abliserve.server.engines.base import SamplingOptions, TokenLogprob


def make_generator(options: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """The request's private random stream (None for greedy requests, which need none)."""
    if options.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    generator.manual_seed(seed)
    return generator


def sample_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row's logits [vocab] (float32)."""
    if options.temperature < torch.finfo(logits.dtype).tiny:  # 0, or 0 once in the logits' dtype
        return int(torch.argmax(logits))
    # Shift before dividing: a tiny temperature then sends the others to -inf, never the top
    # logit to +inf (inf - inf = NaN would make the row unsampleable).
    probs = torch.softmax((logits - logits.max()) / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= options.top_p
        outside[0] = False  # a top_p that rounds to 0 in float32 still keeps the top token
        sorted_probs[outside] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """Log-probability of the chosen token under the model's (untempered) distribution, and the
    ``top`` most likely alternatives, as OpenAI's ``logprobs`` reports them."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives: dict[int, float] = {}
    if top > 0:
        values, indices = torch.topk(logprobs, top)
        alternatives = dict(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=alternatives)
