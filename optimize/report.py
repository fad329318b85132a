"""The Pareto front of a search: a table on the terminal (rich) and a PNG plot of every
trial's refusal rate against its first-token KL, the front highlighted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from optuna.trial import FrozenTrial

from abliserve.directions.report import save_figure


def print_front(rows: Sequence[dict], baseline: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "Pareto front (validation prompts)"
    if baseline:
        title += f"; baseline refusals {baseline['refusal_rate']:.1%}"
    table = Table(title=title)
    for column in (
        "trial",
        "refusals (JBB)",
        "refusals (heretic)",
        "KL",
        "estimator",
        "rank",
        "filter",
        "direction",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        params = row["params"]
        direction = (
            "per layer"
            if params["direction_scope"] == "per layer"
            else f"{params['direction_index']:.2f}"
        )
        table.add_row(
            str(row["trial"]),
            f"{row['refusal_rate']:.1%}",
            f"{row['refusal_rate_heretic']:.1%}",
            f"{row['kl']:.4f}",
            params["estimator"],
            str(params["harmless_rank"]),
            "yes" if params["filter_prompts"] else "no",
            direction,
        )
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: keep each row on one line
        console = Console(stderr=True, width=140)
    console.print(table)


def save_front_plot(
    trials: Sequence[FrozenTrial],
    front: Sequence[FrozenTrial],
    baseline: dict | None,
    path: Path,
    title: str = "abliserve directions optimize",
) -> Path:
    """Write the plot atomically (a temporary file renamed into place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter(
        [t.values[1] for t in trials],
        [100 * t.values[0] for t in trials],
        s=14,
        color="tab:grey",
        alpha=0.6,
        label=f"trials ({len(trials)})",
    )
    ordered = sorted(front, key=lambda t: t.values[1])
    axis.step(
        [t.values[1] for t in ordered],
        [100 * t.values[0] for t in ordered],
        "o-",
        where="post",
        color="tab:red",
        label="Pareto front",
    )
    for trial in ordered:
        axis.annotate(
            str(trial.number),
            (trial.values[1], 100 * trial.values[0]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if baseline:
        axis.axhline(
            100 * baseline["refusal_rate"], color="tab:blue", linestyle=":", label="baseline"
        )
    axis.set_xscale("symlog", linthresh=0.01)
    axis.set_xlabel("first-token KL(baseline ‖ ablated), harmless validation prompts")
    axis.set_ylabel("refusals, harmful validation prompts (%)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
