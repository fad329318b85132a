"""The per-layer report of a direction computation: a table on the terminal (rich) and a PNG
plot of refusal score and KL per candidate layer, so the trade-off behind the automatic choice
is always visible (and reproducible from the artifact's metadata)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from abliserve.directions.select import CandidateScore


def print_table(
    scores: Sequence[CandidateScore], chosen: int, kl_bound: float, baseline_refusal: float
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"candidate layers (baseline harmful refusal score {baseline_refusal:+.2f}; "
        f"KL bound {kl_bound})"
    )
    for column in ("layer", "refusal score (ablated)", "KL (harmless)", "induce score", "passes"):
        table.add_column(column, justify="right")
    for score in scores:
        style = "bold green" if score.layer == chosen else None
        table.add_row(
            f"{score.layer}{' *' if score.layer == chosen else ''}",
            f"{score.refusal:+.3f}",
            f"{score.kl:.4f}",
            f"{score.induce:+.3f}",
            "yes" if score.passes(kl_bound) else "no",
            style=style,
        )
    Console(stderr=True).print(table)


def save_plot(
    scores: Sequence[CandidateScore], chosen: int, kl_bound: float, path: Path, title: str
) -> Path:
    """Write the plot atomically (a temporary file renamed into place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in scores]
    figure, refusal_axis = plt.subplots(figsize=(8, 4.5))
    refusal_axis.plot(
        layers,
        [s.refusal for s in scores],
        "o-",
        color="tab:red",
        label="refusal score, ablated (harmful)",
    )
    refusal_axis.plot(
        layers,
        [s.induce for s in scores],
        "s--",
        color="tab:orange",
        label="refusal score, induced (harmless)",
    )
    refusal_axis.axhline(0, color="grey", linewidth=0.5)
    refusal_axis.axvline(chosen, color="tab:green", linestyle=":", label=f"chosen layer {chosen}")
    refusal_axis.set_xticks(layers)
    refusal_axis.set_xlabel("candidate layer (residual stream entering it)")
    refusal_axis.set_ylabel("refusal log-odds (first token)")
    kl_axis = refusal_axis.twinx()
    kl_axis.plot(layers, [s.kl for s in scores], "^-", color="tab:blue", label="KL (harmless)")
    kl_axis.axhline(kl_bound, color="tab:blue", linestyle=":", linewidth=0.8)
    kl_axis.set_ylabel("first-token KL(baseline || ablated)")
    handles = refusal_axis.get_legend_handles_labels()
    kl_handles = kl_axis.get_legend_handles_labels()
    refusal_axis.legend(
        handles[0] + kl_handles[0], handles[1] + kl_handles[1], fontsize=8, loc="best"
    )
    refusal_axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (a crash never leaves half a plot behind) and
    close it; shared by every plot the direction tools draw."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp_name, dpi=110)
        os.replace(tmp_name, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path
