"""The strength-sweep plot: how refusals and damage move as α goes 0 → 1 (docs/EVAL.md), the
picture users calibrate the dose from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from abliserve.clients.evaluate import StrengthSummary


def plot_sweep(summaries: Sequence[StrengthSummary], path: Path, title: str) -> None:
    """Refusal rates (left) and first-token KL (right) against strength, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    strengths = [row.strength for row in summaries]
    figure, (refusals, damage) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    lines = [
        ([r.harmful_refusal_jailbreakbench for r in summaries], "harmful, JBB markers", "o-"),
        ([r.harmful_refusal_heretic for r in summaries], "harmful, heretic markers", "s--"),
    ]
    if summaries[0].harmless_n:  # over-refusal, when the run had harmless prompts
        lines += [
            ([r.harmless_refusal_jailbreakbench for r in summaries], "harmless, JBB markers", "^-"),
            ([r.harmless_refusal_heretic for r in summaries], "harmless, heretic markers", "v--"),
        ]
    for values, label, style in lines:
        refusals.plot(strengths, [100 * value for value in values], style, label=label)
    refusals.set(xlabel="ablation strength α", ylabel="refusal rate (%)", ylim=(-2, 102))
    refusals.set_title(
        f"refusals (n = {summaries[0].harmful_n} harmful, {summaries[0].harmless_n} harmless)"
    )
    refusals.legend()
    refusals.grid(alpha=0.3)
    damage.plot(strengths, [r.kl_mean for r in summaries], "o-", label="mean")
    damage.plot(strengths, [r.kl_median for r in summaries], "s--", label="median")
    damage.set(xlabel="ablation strength α", ylabel="KL(baseline ‖ ablated), nats")
    damage.set_title(f"first-token KL on harmless prompts (n = {summaries[0].kl_n})")
    damage.legend()
    damage.grid(alpha=0.3)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
