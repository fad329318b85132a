"""A left-padded batch of KV caches that requests can join and leave between decode steps.

Rows are left-padded to a common length; the 2-D attention mask [batch, positions] marks real
positions with 1. Position ids are tracked per row by the engine, so a row's keys are rotated
exactly as they would be alone, and masked padding contributes nothing. That is what lets a
request join a running batch (continuous batching: prefill it separately, then merge caches)
and leave it (drop its row, then trim columns that are padding in every remaining row).

Only plain full-attention layers (``DynamicLayer``) are merged: recurrent layers keep state that
cannot be padded this way, and :func:`check_supported` says so. Sliding-window models (Mistral,
Gemma 2/3, gpt-oss) are served with full caches and a context capped at their window
(:func:`sliding_window_limit`): a row never spans more than the window, so the model's sliding
mask hides nothing and a full cache gives the same attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def sliding_window_limit(config) -> int:
    """The smallest attention window of the model's sliding layers (a huge number if none)."""
    cache = DynamicCache(config=config)  # transformers' own reading of which layers slide
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        text_config = config.get_text_config(decoder=True)
        return int(getattr(text_config, "sliding_window", None) or 2**31)
    return 2**31


def check_supported(cache: DynamicCache) -> None:
    """Fail loudly for caches whose layers this module cannot merge."""
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ValueError(
            f"the transformers engine batches only full-attention KV caches; this model uses "
            f"{sorted(kinds)} layers"
        )


@dataclass
class KVBatch:
    """KV cache [batch, heads, positions, head_dim] per layer plus its 2-D attention mask."""

    cache: DynamicCache
    mask: torch.Tensor  # [batch, positions] long, 1 = real token, 0 = left padding

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def _map(self, function) -> None:
        for layer in self.cache.layers:
            layer.keys = function(layer.keys)
            layer.values = function(layer.values)

    def pad_left(self, count: int) -> None:
        """Prepend ``count`` masked positions to every row."""
        if count <= 0:
            return

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            batch, heads, _, head_dim = tensor.shape
            zeros = tensor.new_zeros(batch, heads, count, head_dim)
            return torch.cat([zeros, tensor], dim=-2)

        self._map(pad)
        self.mask = torch.cat([self.mask.new_zeros(self.rows, count), self.mask], dim=1)

    def keep_rows(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (in that order), then drop all-padding columns."""
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self._map(lambda tensor: tensor.index_select(0, index.to(tensor.device)))
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        """Drop leading positions that are padding in every row (they only cost time)."""
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else self.length
        if start > 0:
            self._map(lambda tensor: tensor[:, :, start:, :])
            self.mask = self.mask[:, start:]

    def append(self, other: KVBatch) -> None:
        """Add ``other``'s rows after ours, padding whichever is shorter on the left."""
        self.pad_left(other.length - self.length)
        other.pad_left(self.length - other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def extend_mask(self) -> torch.Tensor:
        """Mask for the next decode step (one new real position per row); becomes ours."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask
