"""Choosing the next token of one batch row: a pure function of that row's logits and history.

Each row samples on its own (its own controls and random generator), so a request's tokens do
not depend on which other requests share its batch: greedy rows take the arg-max of their
processed logits, and a seeded request draws from its own ``torch.Generator`` exactly as it
would alone.

The controls are applied in vLLM's order (its V1 sampler), so greedy requests pick the same
tokens on both engines: logit bias, the ``min_tokens`` mask, then the repetition, frequency and
presence penalties; greedy stops there. Random sampling then divides by the temperature and
applies ``min_p``, ``top_k`` and ``top_p``. Log-probabilities are reported from the raw logits,
as vLLM does by default.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

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


def processed_logits(
    logits: torch.Tensor,
    options: SamplingOptions,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    stop_ids: frozenset[int],
) -> torch.Tensor:
    """One row's logits [vocab] after bias, the ``min_tokens`` mask and the penalties (a copy;
    the raw logits stay for logprobs)."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if options.logit_bias:
        ids = torch.tensor(list(options.logit_bias), dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(options.logit_bias.values()), device=logits.device)
        logits.index_add_(0, ids, bias.to(logits.dtype))
    if len(output_ids) < options.min_tokens and stop_ids:
        logits[torch.tensor(sorted(stop_ids), device=logits.device)] = -float("inf")
    if options.repetition_penalty != 1.0:
        seen = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long, device=logits.device)
        mask = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        mask[seen] = True
        penalty = options.repetition_penalty
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(mask, penalised, logits)
    if (options.frequency_penalty or options.presence_penalty) and output_ids:
        output = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)
        logits -= options.frequency_penalty * counts
        logits -= options.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> int:
    """Pick the next token from one row's processed logits [vocab] (float32)."""
    if options.temperature < torch.finfo(logits.dtype).tiny:  # 0, or 0 once in the logits' dtype
        return int(torch.argmax(logits))
    top = logits.max()
    if torch.isposinf(top):
        # A repetition penalty near 0 divides positive logits into +inf: those tokens tie, and
        # inf - inf below would make the whole row NaN (unsampleable).
        probs = (logits == top).to(logits.dtype)
    else:
        # Shift before dividing: a tiny temperature then sends the others to -inf, never the
        # top logit to +inf.
        probs = torch.softmax((logits - top) / options.temperature, dim=-1)
    if options.min_p > 0.0:
        probs = torch.where(probs < options.min_p * probs.max(), 0.0, probs)
    if 0 < options.top_k < probs.shape[-1]:
        kth = torch.topk(probs, options.top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if options.top_p < 1.0:
        probs = probs / probs.sum()
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= options.top_p
        outside[0] = False  # a top_p that rounds to 0 in float32 still keeps the top token
        sorted_probs[outside] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """Log-probability of the chosen token under the model's raw distribution, and the ``top``
    most likely alternatives, as OpenAI's ``logprobs`` reports them."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives: dict[int, float] = {}
    if top > 0:
        values, indices = torch.topk(logprobs, top)
        alternatives = dict(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=alternatives)
