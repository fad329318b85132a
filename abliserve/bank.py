"""The direction bank: every loaded direction stacked into one tensor, addressed by slot.

Slot 0 is all zeros, the no-op used for baseline requests and padding rows (the sentinel of
vLLM's LoRA index buffers). Slot ``i`` (1-based) holds the i-th named direction. Engines route
rows to slots; a row's effective strength at site ``k`` is ``strength * weights[slot, k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the core only reads an artifact's tensors; it does not depend on directions
    from abliserve.directions.artifact import DirectionArtifact


@dataclass
class DirectionBank:
    names: list[str]  # names[i] lives in slot i + 1
    directions: torch.Tensor  # [1 + N, sites, hidden] float32, slot 0 zeros
    weights: torch.Tensor  # [1 + N, sites] float32, slot 0 zeros

    @classmethod
    def from_artifacts(
        cls, artifacts: dict[str, DirectionArtifact], num_sites: int, hidden_size: int
    ) -> DirectionBank:
        names = list(artifacts)
        directions = torch.zeros(1 + len(names), num_sites, hidden_size)
        weights = torch.zeros(1 + len(names), num_sites)
        for slot, name in enumerate(names, start=1):
            directions[slot] = artifacts[name].directions
            weights[slot] = artifacts[name].weights
        return cls(names=names, directions=directions, weights=weights)

    def slot(self, name: str | None) -> int:
        """Slot of a named direction; None (baseline) is slot 0."""
        return 0 if name is None else self.names.index(name) + 1

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> DirectionBank:
        return DirectionBank(
            self.names, self.directions.to(device, dtype), self.weights.to(device, torch.float32)
        )
