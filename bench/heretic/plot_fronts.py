"""Summarise and plot fronts evaluated by bench/heretic/evaluate_fronts.sh.

    .venv/bin/python bench/heretic/plot_fronts.py WORK_DIR FRONT_DIR... [--earlier FRONTS_JSON]

Reads WORK/eval/NAME/summary.json for every artifact of every front folder, plus the fronts of
an earlier run's fronts.json (``--earlier``: a front evaluated on the same test before, whose
artifacts are no longer at hand, e.g. bench/heretic/results/fronts_jbb.json; a front measured
now replaces an earlier one of the same name); prints a markdown
table (also WORK/fronts.md, with WORK/fronts.json) and draws refusals (JailbreakBench markers)
against first-token KL, one series per front, to bench/heretic/fronts.png. A point marked * is on
its own front's test-set Pareto front (no other point of that front has both fewer refusals and
lower KL).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PLOT = Path(__file__).resolve().parent / "fronts.png"


def strength_row(work: Path, name: str, strength: float) -> dict | None:
    summary = work / "eval" / name / "summary.json"
    if not summary.is_file():
        return None
    rows = json.loads(summary.read_text())["strengths"]
    return next((row for row in rows if row["strength"] == strength), None)


def dominated(point: dict, others: list[dict]) -> bool:
    return any(
        o["refusal_jbb"] <= point["refusal_jbb"]
        and o["kl"] <= point["kl"]
        and (o["refusal_jbb"], o["kl"]) != (point["refusal_jbb"], point["kl"])
        for o in others
    )


def collect(work: Path, fronts: list[Path]) -> tuple[dict | None, dict[str, list[dict]]]:
    baseline, points = None, {}
    for front in fronts:
        series = []
        for artifact in sorted(front.glob("*.safetensors")):
            row = strength_row(work, artifact.stem, 1.0)
            if row is None:
                continue
            baseline = baseline or strength_row(work, artifact.stem, 0.0)
            series.append(
                {
                    "name": artifact.stem,
                    "refusal_jbb": row["harmful_refusal_jailbreakbench"],
                    "refusal_heretic": row["harmful_refusal_heretic"],
                    "kl": row["kl_mean"],
                }
            )
        for point in series:
            point["pareto"] = not dominated(point, series)
        points[front.name] = sorted(series, key=lambda p: p["kl"])
    return baseline, points


def table(baseline: dict | None, points: dict[str, list[dict]]) -> str:
    lines = [
        "| front | direction | refusals (JBB markers) | refusals (heretic) | first-token KL |",
        "|---|---|---:|---:|---:|",
    ]
    if baseline:
        lines.append(
            f"| — | baseline | {baseline['harmful_refusal_jailbreakbench']:.0%} | "
            f"{baseline['harmful_refusal_heretic']:.0%} | 0 |"
        )
    for front, series in points.items():
        for p in series:
            star = " *" if p["pareto"] else ""
            lines.append(
                f"| {front} | {p['name']}{star} | {p['refusal_jbb']:.0%} | "
                f"{p['refusal_heretic']:.0%} | {p['kl']:.3f} |"
            )
    return "\n".join(lines)


def plot(points: dict[str, list[dict]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for (front, series), marker in zip(points.items(), "os^D", strict=False):
        axes.scatter(
            [p["kl"] for p in series],
            [100 * p["refusal_jbb"] for p in series],
            marker=marker,
            alpha=0.5,
            label=f"{front} (all points)",
        )
        best = [p for p in series if p["pareto"]]
        axes.plot(
            [p["kl"] for p in best],
            [100 * p["refusal_jbb"] for p in best],
            marker=marker,
            label=f"{front} (test-set front)",
        )
    axes.set_xlabel("first-token KL on harmless_test[:100]")
    axes.set_ylabel("refusals on 100 JailbreakBench behaviours (%)")
    axes.set_title("Demo model, strength 1, 64 tokens, same server and prompts")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(work_dir: str, *arguments: str) -> None:
    work = Path(work_dir)
    front_dirs, earlier = list(arguments), None
    if "--earlier" in front_dirs:
        at = front_dirs.index("--earlier")
        earlier = json.loads(Path(front_dirs[at + 1]).read_text())
        del front_dirs[at : at + 2]
    baseline, points = collect(work, [Path(f) for f in front_dirs])
    if earlier:
        baseline = baseline or earlier["baseline"]
        points = earlier["fronts"] | points
    text = table(baseline, points)
    print(text)
    (work / "fronts.md").write_text(text + "\n")
    (work / "fronts.json").write_text(
        json.dumps({"baseline": baseline, "fronts": points}, indent=1)
    )
    plot(points, PLOT)
    print(f"plot: {PLOT}")


if __name__ == "__main__":
    main(*sys.argv[1:])
