"""The direction bank: every loaded direction stacked into one tensor, addressed by slot.

Slot 0 is all zeros, the no-op used for baseline requests and padding rows (the sentinel of
vLLM's LoRA index buffers). Engines route rows to slots; a row's effective strength at site
``k`` is ``strength * weights[slot, k]``.

The bank is allocated once at its full capacity: a direction loaded while the server runs is
copied into a free slot in place (:meth:`DirectionBank.write`), so no tensor ever changes shape
or address, and compiled graphs that read the bank stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the core only reads an artifact's tensors; it does not depend on directions
    from abliserve.directions.artifact import DirectionArtifact


@dataclass
class DirectionBank:
    """``names[i]`` lives in slot ``i + 1`` as built; slots past them are free. An engine that
    loads directions while it runs keeps its own name-to-slot table (the engines' base module)."""

    names: list[str]
    directions: torch.Tensor  # [1 + capacity, sites, hidden], slot 0 zeros
    weights: torch.Tensor  # [1 + capacity, sites] float32, slot 0 zeros

    @classmethod
    def from_artifacts(
        cls,
        artifacts: dict[str, DirectionArtifact],
        num_sites: int,
        hidden_size: int,
        capacity: int | None = None,
    ) -> DirectionBank:
        """The artifacts in slots 1, 2, ... in order; ``capacity`` (default: just enough)
        leaves the rest of the slots free for directions loaded later."""
        capacity = len(artifacts) if capacity is None else capacity
        if len(artifacts) > capacity:
            raise ValueError(f"{len(artifacts)} directions do not fit a bank of {capacity} slots")
        bank = cls(
            names=list(artifacts),
            directions=torch.zeros(1 + capacity, num_sites, hidden_size),
            weights=torch.zeros(1 + capacity, num_sites),
        )
        for slot, artifact in enumerate(artifacts.values(), start=1):
            bank.write(slot, artifact)
        return bank

    def slot(self, name: str | None) -> int:
        """Slot of a direction named at construction; None (baseline) is slot 0."""
        return 0 if name is None else self.names.index(name) + 1

    @property
    def capacity(self) -> int:
        return self.directions.shape[0] - 1

    def write(self, slot: int, artifact: DirectionArtifact) -> None:
        """Copy one artifact into ``slot`` in place (never slot 0, the baseline)."""
        if not 1 <= slot <= self.capacity:
            raise ValueError(f"slot {slot} is outside the bank's slots 1..{self.capacity}")
        self.directions[slot].copy_(artifact.directions)
        self.weights[slot].copy_(artifact.weights)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> DirectionBank:
        return DirectionBank(
            self.names, self.directions.to(device, dtype), self.weights.to(device, torch.float32)
        )
