"""Routing each token row of vLLM's flattened batch to its request's direction slot and strength.

A request's ablation travels in ``SamplingParams.extra_args["abliserve"]`` as
``{"slot": int, "strength": float}`` (absent = baseline). Before every forward the model runner
knows the batch's requests in ``input_batch.req_ids`` order and how many rows each contributes
(``num_scheduled_tokens``: the whole prompt chunk at prefill, one row at decode). The rows are
contiguous per request in that order, so the per-token values are ``np.repeat(per_request,
num_scheduled_tokens)``, written in place into persistent buffers the custom op reads (the same
shape as vLLM's LoRA token mapping). Rows past the batch (CUDA-graph padding) stay at slot 0,
strength 0: a no-op.

Nothing here imports vLLM, so the routing is unit-tested without an engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

EXTRA_ARGS_KEY = "abliserve"
BASELINE_ROUTE = (0, 0.0)

logger = logging.getLogger(__name__)


def ablation_extra_args(slot: int, strength: float) -> dict[str, Any] | None:
    """The ``extra_args`` that ask the worker for ``strength`` of bank slot ``slot``."""
    if slot == 0 or strength == 0.0:
        return None
    return {EXTRA_ARGS_KEY: {"slot": int(slot), "strength": float(strength)}}


def request_route(extra_args: Mapping[str, Any] | None, num_slots: int) -> tuple[int, float]:
    """(slot, strength) of one request from its ``extra_args``.

    The front end validates requests before they reach vLLM; anything malformed that still gets
    here (another client of the same vLLM, say) is served at baseline rather than crashing the
    engine for every request in the batch.
    """
    spec = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if spec is None:
        return BASELINE_ROUTE
    try:
        slot, strength = int(spec["slot"]), float(spec["strength"])
    except (KeyError, TypeError, ValueError):
        logger.warning("ignoring malformed abliserve extra_args %r", spec)
        return BASELINE_ROUTE
    if not (0 <= slot < num_slots) or not math.isfinite(strength):
        logger.warning("ignoring abliserve extra_args %r: %d slots loaded", spec, num_slots)
        return BASELINE_ROUTE
    return slot, strength


class TokenRouting:
    """Persistent per-token buffers (``slots`` int64, ``strengths`` float32, [max_tokens]).

    Their storage never moves after construction: compiled graphs and CUDA graphs keep reading
    the same addresses, and :meth:`fill` changes only the values.
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        device = torch.device(device)
        pin = device.type == "cuda"
        self.num_slots = num_slots
        self.slots = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.strengths = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        # Host staging copies: filled with numpy, then copied asynchronously to the device.
        self._host_slots = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
        self._host_strengths = torch.zeros(max_tokens, dtype=torch.float32, pin_memory=pin)
        self._rows_in_use = 0  # rows that may be non-zero on the device

    @property
    def max_tokens(self) -> int:
        return self.slots.shape[0]

    def fill(self, routes: Sequence[tuple[int, float]], num_scheduled_tokens: np.ndarray) -> None:
        """Write each request's (slot, strength) into its rows; zero every row after them.

        routes:               one (slot, strength) per request, in ``input_batch.req_ids`` order
        num_scheduled_tokens: [requests] rows each request has in this forward, same order
        """
        counts = np.asarray(num_scheduled_tokens, dtype=np.int64)
        if len(routes) != len(counts):
            raise ValueError(f"{len(routes)} routes for {len(counts)} scheduled requests")
        rows = int(counts.sum())
        if rows > self.max_tokens:
            raise ValueError(f"{rows} scheduled tokens exceed the {self.max_tokens}-row buffers")
        if rows == 0 or all(strength == 0.0 for _, strength in routes):
            rows = 0  # a baseline batch: only stale rows from the last step need clearing
        else:
            slots = np.fromiter((slot for slot, _ in routes), np.int64, len(routes))
            strengths = np.fromiter((s for _, s in routes), np.float32, len(routes))
            self._host_slots.numpy()[:rows] = np.repeat(slots, counts)
            self._host_strengths.numpy()[:rows] = np.repeat(strengths, counts)
        dirty = max(rows, self._rows_in_use)
        if dirty == 0:
            return
        self._host_slots[rows:dirty] = 0
        self._host_strengths[rows:dirty] = 0.0
        self.slots[:dirty].copy_(self._host_slots[:dirty], non_blocking=True)
        self.strengths[:dirty].copy_(self._host_strengths[:dirty], non_blocking=True)
        self._rows_in_use = rows
