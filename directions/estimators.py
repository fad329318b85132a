"""Direction estimators: what "the" refusal direction of a layer is, beyond the difference of
means (docs/MATHS.md, choosing a direction).

All work on cached last-token activations ``[prompts, L + 1, hidden]`` (one row per residual
index, as :mod:`abliserve.directions.extract` records them) and return one candidate per residual
index, ``[L + 1, hidden]``:

- ``mean``: harmful mean minus harmless mean (Arditi et al.).
- ``median``: per-coordinate medians instead of means, so a few prompts with outsized
  activations (long prompts, odd tokens) cannot drag the direction.
- ``variance-scaled``: the mean difference divided by the pooled per-coordinate variance (a
  diagonal-covariance discriminant): coordinates that swing widely on every prompt, and are
  therefore changed by ablation on every prompt, count less.

Any of them can then be made orthogonal to the top principal components of the harmless
activations at that layer (``harmless_rank``): ablation then leaves alone the directions along
which ordinary prompts vary most, which is what first-token KL on harmless prompts measures.
"""

from __future__ import annotations

from enum import Enum

import torch

from abliserve.projection import normalise

# The pooled variance is floored at this fraction of its mean, so a coordinate that never moves
# cannot blow up the scaled difference.
VARIANCE_FLOOR = 1e-3


class Estimator(str, Enum):
    MEAN = "mean"
    MEDIAN = "median"
    VARIANCE_SCALED = "variance-scaled"


def difference(harmful: torch.Tensor, harmless: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """Unnormalised harmful-minus-harmless statistic [L + 1, hidden] in float64."""
    bad, good = harmful.double(), harmless.double()
    if estimator is Estimator.MEDIAN:
        return bad.median(0).values - good.median(0).values
    delta = bad.mean(0) - good.mean(0)
    if estimator is Estimator.MEAN:
        return delta
    pooled = (bad.var(0) * (len(bad) - 1) + good.var(0) * (len(good) - 1)) / max(
        len(bad) + len(good) - 2, 1
    )
    floor = VARIANCE_FLOOR * pooled.mean(-1, keepdim=True).clamp_min(1e-12)
    return delta / torch.maximum(pooled, floor)


def harmless_subspace(harmless: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal bases [L + 1, rank, hidden] (float64) of the top ``rank`` principal
    components of the (centred) harmless activations at every residual index."""
    centred = harmless.double() - harmless.double().mean(0)
    # [L + 1, prompts, hidden]: one SVD per residual index, batched.
    _, _, vh = torch.linalg.svd(centred.transpose(0, 1), full_matrices=False)
    return vh[:, :rank]


def project_out_subspace(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``vectors`` [L + 1, hidden] minus their components in the orthonormal ``basis``
    [L + 1, rank, hidden]."""
    coefficients = torch.einsum("lh,lrh->lr", vectors, basis)
    return vectors - torch.einsum("lr,lrh->lh", coefficients, basis)


def candidate_directions(
    harmful: torch.Tensor, harmless: torch.Tensor, estimator: Estimator, harmless_rank: int = 0
) -> torch.Tensor:
    """Unit candidate directions [L + 1, hidden] float32, one per residual index (a residual
    index whose statistic is zero keeps a zero row, which ablates nothing)."""
    vectors = difference(harmful, harmless, estimator)
    if harmless_rank > 0:
        vectors = project_out_subspace(vectors, harmless_subspace(harmless, harmless_rank))
    return normalise(vectors).float()
