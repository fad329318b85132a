"""The per-token ablation as a PyTorch custom op, so compiled graphs and CUDA graphs contain it.

vLLM flattens a continuous batch into one ``[tokens, hidden]`` tensor. Each token row belongs to
one request, and each request may ask for a different direction and strength. The op reads both
from persistent per-token buffers (``slots``, ``strengths``) that the model runner refills in
place before every forward, the trick vLLM's LoRA uses for its per-token adapter indices. The
graph holds only the buffers' addresses, so a captured CUDA graph replays correctly with new
values, and Python never branches on a request inside the forward.

Semantics, for ``n = out.shape[0]`` rows (rows past the last real token are padding; the runner
keeps their slot and strength at 0)::

    for t in range(n):
        s = slots[t]
        out[t] -= strengths[t] * site_weights[s] * (out[t] . site_directions[s]) site_directions[s]

Slot 0 of the bank is all zeros, so baseline and padding rows are left unchanged (up to the
float32 round trip, which is exact for float32 and bfloat16 activations).

The maths is :func:`abliserve.projection.ablate`: one implementation for every engine.
"""

from __future__ import annotations

import torch

from abliserve.projection import ablate

OP_NAME = "abliserve::ablate_tokens"


@torch.library.custom_op(OP_NAME, mutates_args=())
def ablate_tokens(
    out: torch.Tensor,
    site_directions: torch.Tensor,
    site_weights: torch.Tensor,
    slots: torch.Tensor,
    strengths: torch.Tensor,
) -> torch.Tensor:
    """Ablate each row of ``out`` [tokens, hidden] with its own bank slot and strength.

    site_directions: [1 + N, hidden] this site's direction of every bank slot (slot 0 zeros)
    site_weights:    [1 + N]         this site's strength multiplier of every slot
    slots:           [max_tokens]    int64 bank slot of each token row (persistent buffer)
    strengths:       [max_tokens]    float32 strength of each token row (persistent buffer)
    """
    rows = out.shape[0]
    row_slots = slots[:rows]
    # index_select, not advanced indexing: the latter's generic CPU kernel was 98% of the op.
    alpha = strengths[:rows] * site_weights.index_select(0, row_slots)
    return ablate(out, site_directions.index_select(0, row_slots), alpha)


@ablate_tokens.register_fake
def _ablate_tokens_fake(
    out: torch.Tensor,
    site_directions: torch.Tensor,
    site_weights: torch.Tensor,
    slots: torch.Tensor,
    strengths: torch.Tensor,
) -> torch.Tensor:
    """Shape-only version used while tracing: the output is a fresh tensor like ``out``."""
    return torch.empty_like(out)
