"""The one implementation of directional ablation (docs/MATHS.md).

Every writer of the residual stream (the embedding output, every attention output projection
and every MLP output projection) has its output projected once:

    out <- out - alpha * w_site * (out . r_site) r_site

with ``r_site`` a unit vector. The transformers hooks, the vLLM custom op and the weight
exporter all call into this module, so "hooks at alpha == orthogonalised weights at alpha" holds
by construction and is checked by tests.

Sites are named once, here, by their logical role in Llama's module names (``embed_tokens``,
``layers.{i}.self_attn.o_proj``, ``layers.{i}.mlp.down_proj``) and kept in a canonical order:
the embedding first, then attention and MLP of each layer. Which modules write each site in a
given architecture (post-norms, MoE blocks, several embeddings) is
:mod:`abliserve.architectures`' business.
"""

from __future__ import annotations

import torch

EMBED_SITE = "embed_tokens"


def attention_site(layer: int) -> str:
    """Name of the attention output writer of ``layer``."""
    return f"layers.{layer}.self_attn.o_proj"


def mlp_site(layer: int) -> str:
    """Name of the MLP output writer of ``layer``."""
    return f"layers.{layer}.mlp.down_proj"


def site_names(num_layers: int) -> list[str]:
    """All writer sites of a decoder with ``num_layers`` layers, in canonical order (2L + 1)."""
    names = [EMBED_SITE]
    for layer in range(num_layers):
        names += [attention_site(layer), mlp_site(layer)]
    return names


def site_layer(site_index: int) -> int:
    """Decoder layer a canonical site index belongs to (-1 for the embedding)."""
    return -1 if site_index == 0 else (site_index - 1) // 2


def ablate(out: torch.Tensor, direction: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """Remove ``alpha`` times the component of ``out`` along a unit ``direction``.

    out:       [..., hidden] activations written into the residual stream
    direction: [hidden] unit vector, or [..., hidden] one unit vector per row (zeros = no-op)
    alpha:     scalar, or [...] one strength per row (already multiplied by the site weight)

    The dot product is taken in float32 (or the input's dtype if wider) so that low-precision
    activations lose no more than one rounding when cast back.
    """
    compute_dtype = torch.promote_types(out.dtype, torch.float32)
    x = out.to(compute_dtype)
    r = direction.to(compute_dtype)
    coefficient = (x * r).sum(dim=-1, keepdim=True)
    if isinstance(alpha, torch.Tensor):
        coefficient = coefficient * alpha.to(compute_dtype).unsqueeze(-1)
    else:
        coefficient = coefficient * alpha
    return (x - coefficient * r).to(out.dtype)


def orthogonalise_output_weight(
    weight: torch.Tensor, direction: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Bake the ablation into a linear layer whose output is written to the stream.

    weight: [hidden_out, in] (nn.Linear layout); returns ``(I - alpha r r^T) W`` in the input dtype.
    """
    down, up = rank_one_ablation(weight, direction)
    return (weight.to(torch.float64) + alpha * (up @ down)).to(weight.dtype)


def rank_one_ablation(
    weight: torch.Tensor, direction: torch.Tensor, outputs_on_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ablation of a writer as a rank-1 update: factors ``(down, up)`` in float64.

    Linear writer W [out, in] (``out = W x``): ``(I - alpha r r^T) W = W + alpha * up @ down``
    with ``down = r^T W`` [1, in] and ``up = -r`` [out, 1]. Embedding E [vocab, hidden]
    (``outputs_on_rows``): ``E (I - alpha r r^T) = E + alpha * down^T @ up^T`` with
    ``down = (E r)^T`` [1, vocab]. These are a LoRA adapter's A and B at scaling alpha, which is
    why a rank-1 adapter per writer is the ablation exactly, not an approximation of it.
    """
    w = weight.to(torch.float64)
    r = direction.to(torch.float64)
    down = (w @ r if outputs_on_rows else r @ w).unsqueeze(0)
    return down, -r.unsqueeze(1)


def orthogonalise_embedding(
    embedding: torch.Tensor, direction: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Bake the ablation into an embedding matrix [vocab, hidden] whose rows are outputs."""
    return ablate(embedding.to(torch.float64), direction.to(torch.float64), alpha).to(
        embedding.dtype
    )


def orthogonalise_bias(bias: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bake the ablation into an output bias [hidden] (a writer's constant output)."""
    return orthogonalise_embedding(bias, direction, alpha)


def normalise(vector: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit-normalise along the last dimension, leaving all-zero rows at zero."""
    norm = vector.norm(dim=-1, keepdim=True)
    return vector / norm.clamp_min(eps)


def project_out(direction: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Projected abliteration: remove from ``direction`` its component along ``other``.

    Both [..., hidden]; ``other`` need not be unit. Returns the unnormalised remainder.
    """
    other_unit = normalise(other.to(torch.float64))
    d = direction.to(torch.float64)
    return (d - (d * other_unit).sum(-1, keepdim=True) * other_unit).to(direction.dtype)
