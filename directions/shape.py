"""An ablation's shape: which direction every writer removes and how strongly.

The optimiser (``abliserve directions optimize``) searches this space; it contains heretic's:

- **direction index** (a float over residual indices, or None = per layer): a fractional index
  interpolates the two neighbouring residual indices' directions linearly and renormalises, so
  the search moves smoothly between layers; None gives every writer the direction of the
  residual it writes into.
- **a tent kernel per writer kind** (attention output and MLP output apart, since they damage
  the model differently): weight ``max_weight`` at decoder layer ``max_weight_position``,
  falling linearly to ``min_weight`` at ``min_weight_distance`` layers away, 0 beyond.
- **the embedding's weight** (heretic leaves the embedding alone; here it is searched).

The result is the artifact layout of docs/MATHS.md: directions [2L + 1, hidden], weights [2L + 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from abliserve.projection import normalise, site_layer


@dataclass(frozen=True)
class Kernel:
    """A tent over decoder layers (positions and distances in layers, may be fractional)."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        fraction = distance / self.min_weight_distance
        return self.max_weight + fraction * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class AblationShape:
    direction_index: float | None  # residual index (fractional); None = per layer
    attention: Kernel
    mlp: Kernel
    embedding_weight: float = 0.0

    def describe(self) -> dict:
        return asdict(self)


def interpolate(candidates: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at fractional residual ``index`` of ``candidates`` [L + 1, hidden]:
    the normalised linear interpolation of its two neighbours (exactly a row at integers)."""
    if not 0 <= index <= len(candidates) - 1:
        raise ValueError(f"direction index {index} outside 0..{len(candidates) - 1}")
    fraction, whole = math.modf(index)
    low = candidates[int(whole)]
    if fraction == 0:
        return low
    return normalise(torch.lerp(low.double(), candidates[int(whole) + 1].double(), fraction)).to(
        candidates.dtype
    )


def site_tensors(
    candidates: torch.Tensor, shape: AblationShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """Artifact tensors (directions [2L + 1, hidden], weights [2L + 1]) of ``shape`` over the
    unit ``candidates`` [L + 1, hidden] (one per residual index)."""
    num_layers = len(candidates) - 1
    shared = (
        None if shape.direction_index is None else interpolate(candidates, shape.direction_index)
    )
    directions, weights = [], []
    for site in range(2 * num_layers + 1):
        layer = site_layer(site)  # -1 = the embedding
        # A writer of layer j writes into residual index j + 1 (the embedding into 0).
        directions.append(candidates[layer + 1] if shared is None else shared)
        if layer < 0:
            weights.append(shape.embedding_weight)
        else:
            kernel = shape.attention if site % 2 == 1 else shape.mlp
            weights.append(kernel.weight(layer))
    stacked, weighted = torch.stack(directions), torch.tensor(weights, dtype=torch.float32)
    # A writer with nothing to remove gets weight 0, so the artifact's weights say what is
    # ablated. Per layer this is the embedding of a chat model: residual 0 at the last prompt
    # token is that token's embedding, which the template fixes, so its direction is zero.
    weighted[~stacked.any(dim=-1)] = 0.0
    return stacked, weighted
