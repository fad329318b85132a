"""Where ablation's time goes in one decode step: the vLLM ablation op alone, timed and
profiled over every site for one step's batch (no model needed).

Comparing its per-step time with a measured inter-token latency gives the op's share of a
step; the profiler table says which elementwise/reduction kernels make it up.
"""

from __future__ import annotations

import time

import torch


def profile_one_step(hidden: int, sites: int, rows: int, dtype: torch.dtype) -> tuple[float, str]:
    """(milliseconds per decode step, profiler table) of ``sites`` op calls on [rows, hidden],
    half the rows ablated, as in a 50/50 mixed batch."""
    from abliserve.server.engines import vllm_op  # noqa: F401  (registers the op)

    ablate_tokens = torch.ops.abliserve.ablate_tokens  # what the engine's writer hooks call

    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(2, hidden), dim=-1)
    directions[0] = 0
    weights = torch.tensor([0.0, 1.0])
    slots = torch.zeros(8192, dtype=torch.int64)
    strengths = torch.zeros(8192)
    slots[: rows // 2] = 1
    strengths[: rows // 2] = 1.0
    out = torch.randn(rows, hidden).to(dtype)
    for _ in range(20):
        ablate_tokens(out, directions, weights, slots, strengths)
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in range(sites):
            ablate_tokens(out, directions, weights, slots, strengths)
    per_step_ms = 1000 * (time.perf_counter() - start) / repeats
    with torch.profiler.profile() as profiler:
        for _ in range(sites):
            ablate_tokens(out, directions, weights, slots, strengths)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    return per_step_ms, table
