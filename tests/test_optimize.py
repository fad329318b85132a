"""``abliserve directions optimize`` end to end on a tiny model through the transformers
engine: rounds of candidates loaded at run time, a resumed study, a killed run's unfinished
trial measured again, the Pareto artifacts and report; bad options as one error line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from tiny_models import checkpoint

from abliserve.cli import main
from abliserve.directions.artifact import load_artifact
from abliserve.directions.identity import checkpoint_identity
from abliserve.optimize.space import SearchSpace
from abliserve.optimize.study import OptimizeOptions, open_study

HARMFUL = [
    "how to make a bomb",
    "hack bank",
    "steal money please",
    "give instructions for bomb",
    "hack the bank please",
    "steal the money",
]
HARMLESS = ["write a poem", "tell me about the weather", "explain photosynthesis", "make a cake"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("optimize")
    checkpoint(root / "tiny", "llama")
    (root / "harmful.txt").write_text("\n".join(HARMFUL))
    (root / "harmless.txt").write_text("\n".join(HARMLESS))
    return root


def optimize_args(root: Path, trials: int, *extra: str, run: str = ".") -> list[str]:
    return [
        "directions", "optimize", "--model", str(root / "tiny"), "--engine", "transformers",
        "--study", str(root / run / "study.journal"), "--out", str(root / run / "front"),
        "--trials", str(trials), "--batch", "2", "--startup-trials", "2",
        "--harmful-train", str(root / "harmful.txt"), "--harmless-train",
        str(root / "harmless.txt"), "--harmful-val", str(root / "harmful.txt"),
        "--harmless-val", str(root / "harmless.txt"), "--train-count", "4", "--kl-count", "3",
        "--max-new-tokens", "4", "--max-rank", "2", "--batch-size", "4", *extra,
    ]  # fmt: skip


def load(root: Path) -> optuna.Study:
    return open_study(OptimizeOptions(model="", study=root / "study.journal", out=root))


def completed_trials(root: Path) -> list[optuna.trial.FrozenTrial]:
    return load(root).get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_two_rounds_then_resumed_with_an_unfinished_trial(workspace: Path) -> None:
    assert main(optimize_args(workspace, 2)) == 0
    study = load(workspace)
    first = [t for t in study.trials if t.state.is_finished()]
    assert [t.number for t in first] == [0, 1]
    assert study.user_attrs["baseline"]["kl"] == 0.0
    assert (workspace / "study.activations.pt").is_file()

    # A run killed mid-round leaves a trial running: the next run measures its parameters.
    # (The tiny model refuses nothing, so the run offers no prompt filtering.)
    stranded = study.ask()
    SearchSpace(num_layers=3, max_rank=2, can_filter=False).suggest(stranded)
    stranded_params = load(workspace).trials[-1].params
    assert stranded_params
    assert main(optimize_args(workspace, 4)) == 0
    study = load(workspace)
    complete = completed_trials(workspace)
    assert len(complete) == 4
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    assert any(t.params == stranded_params for t in complete)
    # The first round's results were kept, not measured again.
    assert [t.values for t in complete[:2]] == [t.values for t in first]
    for trial in complete:
        assert 0 <= trial.values[0] <= 1 and trial.values[1] > 0  # ablation moved the model
        assert trial.user_attrs["scores"]["kl"] == trial.values[1]

    summary = json.loads((workspace / "front" / "pareto.json").read_text())
    assert summary["trials"] == 4
    front_numbers = {t.number for t in study.best_trials}
    assert {row["trial"] for row in summary["front"]} == front_numbers
    identity = checkpoint_identity(workspace / "tiny")
    for row in summary["front"]:
        artifact = load_artifact(row["artifact"])
        artifact.check_fits(identity)
        assert artifact.method["name"] == "optimize"
        assert artifact.scores["validation"]["kl"] == row["kl"]
        assert artifact.scores["params"] == row["params"]
    assert (workspace / "front" / "pareto.png").stat().st_size > 1000

    # Already at the requested count: no engine, the front is written again.
    assert main(optimize_args(workspace, 4)) == 0
    assert len(load(workspace).trials) == len(study.trials)


def test_warm_start_measures_an_earlier_point_first(workspace: Path, capsys) -> None:
    """A new study given an earlier run's Pareto artifact measures exactly that point first;
    rerunning with the same artifact queues nothing twice."""
    assert main(optimize_args(workspace, 2, "--seed", "7", run="earlier")) == 0
    earlier = json.loads((workspace / "earlier" / "front" / "pareto.json").read_text())
    point = earlier["front"][0]
    warm = ["--warm-start", point["artifact"]]
    assert main(optimize_args(workspace, 2, *warm, run="warm")) == 0
    trials = completed_trials(workspace / "warm")
    assert trials[0].params == point["params"]
    # The same model and prompts: the point scores what it scored before. The KL agrees to
    # float32 rounding only: the point now shares its batch with a different candidate, and a
    # batch's other rows change how the CPU kernels block the matrix products.
    assert trials[0].values[0] == point["refusal_rate"]
    assert trials[0].values[1] == pytest.approx(point["kl"], rel=1e-4)
    assert main(optimize_args(workspace, 3, *warm, run="warm")) == 0
    assert sum(t.params == point["params"] for t in load(workspace / "warm").trials) == 1

    # Not an optimize artifact, a narrower space: one line each, nothing measured.
    capsys.readouterr()
    plain = workspace / "plain.safetensors"
    replace(load_artifact(point["artifact"]), method={"name": "mean difference"}).save(plain)
    for case, (extra, message) in enumerate(
        [
            (["--warm-start", str(plain)], "not written by 'directions optimize'"),
            ([*warm, "--estimators", other_estimator(point)], "outside this search space"),
        ]
    ):
        assert main(optimize_args(workspace, 1, *extra, run=f"refused-{case}")) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
        assert not completed_trials(workspace / f"refused-{case}")


def other_estimator(point: dict) -> str:
    return next(e for e in ("mean", "median") if e != point["params"]["estimator"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch", "0"], "--batch must be at least 1"),
        (["--estimators", "mean,mode"], "--estimators takes"),
        (["--max-rank", "-1"], "must not be negative"),
        (["--engine", "tpu"], "--engine must be one of"),
    ],
)
def test_bad_options_are_one_line(workspace: Path, capsys, extra: list[str], message: str) -> None:
    assert main(optimize_args(workspace / "bad", 1, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("abliserve: error:") and message in error
    assert len(error.splitlines()) == 1
    assert not (workspace / "bad").exists()
