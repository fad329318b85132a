"""The benchmark's statistics and token-agreement checks (bench/stats.py, bench/compare.py):
pure functions on hand-made traces, no model, no timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from compare import check_tokens, prompt_of_length, rotated
from stats import (
    Agreement,
    RequestTrace,
    agreement,
    over_rounds,
    percentile,
    run_metrics,
    verdict,
)


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_run_metrics_from_token_timestamps():
    # Two requests sent at t=0: tokens at 1, 2, 2 (two in one chunk) and at 3, 5.
    traces = [
        RequestTrace(0.0, (1.0, 2.0, 2.0), (10, 11, 12)),
        RequestTrace(0.0, (3.0, 5.0), (20, 21)),
    ]
    metrics = run_metrics(5.0, traces)
    assert metrics.tokens_per_s == 1.0
    assert metrics.ttft_p50 == 2.0  # TTFTs 1 and 3
    assert metrics.itl_p50 == 1.0  # gaps 1, 0, 2
    assert metrics.itl_p95 == pytest.approx(1.9)
    with pytest.raises(ValueError):
        run_metrics(0.0, traces)


def test_over_rounds_median_and_spread():
    spread = over_rounds([10.0, 12.0, 8.0])
    assert (spread.median, spread.low, spread.high) == (10.0, 8.0, 12.0)
    assert spread.half_range_pct == 20.0


def test_agreement_counts_identical_requests_and_earliest_divergence():
    reference = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9]}
    candidate = {0: [1, 2, 3], 1: [4, 5, 0], 2: [7, 0, 0], 3: [1]}  # 3 has no reference
    result = agreement(candidate, reference)
    assert (result.identical, result.total) == (1, 3)
    assert result.first_divergence == (2, 1)
    assert "1/3 identical" in result.describe()


def test_verdict_marks_mismatch_and_no_op_ablation_wrong():
    assert verdict(Agreement(4, 4, None)) == "ok"
    assert verdict(Agreement(1, 4, (0, 3))).startswith("WRONG")
    assert verdict(Agreement(0, 0, None)).startswith("WRONG")
    # matches the reference but also the unablated run: the ablation did nothing
    assert verdict(Agreement(4, 4, None), Agreement(4, 4, None)).startswith("WRONG")
    assert verdict(None, Agreement(0, 4, (0, 0))) == "ok"


def test_check_tokens_routes_mixed_rows_to_the_right_reference():
    plain = {str(i): [i, 0, 0] for i in range(4)}
    baked = {str(i): [i, 1, 1] for i in range(4)}
    mixed_right = {str(i): (baked if i % 2 == 0 else plain)[str(i)] for i in range(4)}
    lines = check_tokens(
        {
            "plain": plain,
            "baked": baked,
            "vllm-1": baked,
            "vllm-mixed": mixed_right,
            "vllm-0": plain,
        }
    )
    assert all(line.startswith("ok") for line in lines.values()), lines
    wrong = check_tokens({"plain": plain, "baked": baked, "vllm-1": plain})
    assert wrong["vllm-1"].startswith("WRONG")  # fast because it never ablated
    unbaked = check_tokens({"plain": plain, "baked": plain})
    assert unbaked["baked"].startswith("WRONG")


def test_rotation_and_prompt_of_length():
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 3) == ["a", "b", "c"]
    prompts = [[1, 2, 3, 8, 9], [4, 5, 8, 9]]  # common suffix [8, 9]
    long = prompt_of_length(prompts, 7, 0)
    assert len(long) == 7 and long[-2:] == [8, 9] and long[:5] == [1, 2, 3, 4, 5]
