"""The benchmark's arithmetic, kept free of models so it can be unit-tested: per-run metrics
from per-token timestamps, medians with spread over rounds, and token agreement between
configurations that must produce the same tokens.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

# A configuration whose tokens match its reference on fewer requests than this is WRONG.
# Both sides run in float32, where baked weights and runtime projection differ only by
# rounding (~1e-7 relative), so greedy paths should agree on (almost) every request.
MIN_AGREEMENT = 0.75
# An ablating configuration whose tokens match the *unablated* run on more requests than this
# did not ablate (the prompts are harmful ones: ablation changes the first words of a refusal).
MAX_AGREEMENT_WITH_UNABLATED = 0.5


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as
    ``numpy.percentile``'s default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class RequestTrace:
    """One request as the client saw it: when it was sent and when each token arrived."""

    start: float
    token_times: tuple[float, ...]
    token_ids: tuple[int, ...]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies; tokens that arrived in one chunk count as gap 0."""
        times = self.token_times
        return [later - earlier for earlier, later in pairwise(times)]


@dataclass(frozen=True)
class RunMetrics:
    """One configuration at one concurrency level in one round (times in seconds)."""

    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    itl_p50: float
    itl_p95: float

    FIELDS = ("tokens_per_s", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95")


def run_metrics(wall_s: float, traces: Sequence[RequestTrace]) -> RunMetrics:
    """Output tokens/s over the run's wall time; TTFT percentiles over requests; ITL
    percentiles over every inter-token gap of every request."""
    if wall_s <= 0 or not traces:
        raise ValueError(f"need a positive wall time and traces, got {wall_s} and {len(traces)}")
    ttfts = [trace.ttft for trace in traces]
    gaps = [gap for trace in traces for gap in trace.gaps] or [0.0]
    return RunMetrics(
        tokens_per_s=sum(len(trace.token_ids) for trace in traces) / wall_s,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        itl_p50=percentile(gaps, 50),
        itl_p95=percentile(gaps, 95),
    )


@dataclass(frozen=True)
class Spread:
    """Median over rounds, with the lowest and highest round."""

    median: float
    low: float
    high: float

    @property
    def half_range_pct(self) -> float:
        """Half the min-max range as a percentage of the median (0 for one round)."""
        return 0.0 if self.median == 0 else 50 * (self.high - self.low) / self.median


def over_rounds(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no rounds")
    return Spread(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class Agreement:
    """How many requests produced identical token ids, and where the first one diverged."""

    identical: int
    total: int
    first_divergence: tuple[int, int] | None  # (request index, token position)

    @property
    def fraction(self) -> float:
        return self.identical / self.total if self.total else 0.0

    def describe(self) -> str:
        where = ""
        if self.first_divergence is not None:
            request, position = self.first_divergence
            where = f", earliest divergence: request {request} at token {position}"
        return f"{self.identical}/{self.total} identical{where}"


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def agreement(
    candidate: dict[int, Sequence[int]], reference: dict[int, Sequence[int]]
) -> Agreement:
    """Compare the requests (keyed by prompt index) present in both runs."""
    shared = sorted(candidate.keys() & reference.keys())
    identical = 0
    earliest: tuple[int, int] | None = None
    for index in shared:
        a, b = candidate[index], reference[index]
        if list(a) == list(b):
            identical += 1
            continue
        position = common_prefix(a, b)
        if earliest is None or position < earliest[1]:
            earliest = (index, position)
    return Agreement(identical, len(shared), earliest)


def verdict(matches: Agreement | None, unablated: Agreement | None = None) -> str:
    """``ok`` or ``WRONG (why)``: tokens must match the reference (where there is one), and
    an ablating configuration must not match the unablated run."""
    if matches is not None and matches.total == 0:
        return "WRONG (no tokens to compare)"
    if matches is not None and matches.fraction < MIN_AGREEMENT:
        return f"WRONG (matches reference on {matches.identical}/{matches.total})"
    if unablated is not None and unablated.fraction > MAX_AGREEMENT_WITH_UNABLATED:
        return f"WRONG (equals unablated output on {unablated.identical}/{unablated.total})"
    return "ok"
