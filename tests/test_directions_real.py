"""The directions pipeline on the real demo model (``real_model``; about a minute or two):
``directions compute`` end to end on a handful of prompts, and the committed direction
removing refusals at strength 1 that the model gives at strength 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from abliserve.cli import main
from abliserve.datasets import load_instructions
from abliserve.directions.artifact import load_artifact
from abliserve.directions.evaluate import Evaluator
from abliserve.directions.identity import checkpoint_identity
from abliserve.directions.modelio import load_model
from abliserve.refusal import is_refusal

REPO = Path(__file__).resolve().parents[1]
# The first JailbreakBench behaviours (harassment/discrimination), which chat models refuse.
CANDIDATES = 6

pytestmark = pytest.mark.real_model


def test_compute_on_a_handful_of_prompts(demo_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo.safetensors"
    argv = [
        "directions",
        "compute",
        "--model",
        str(demo_checkpoint),
        "--out",
        str(out),
        "--train-count",
        "4",
        "--val-count",
        "2",
        "--layer",
        "14",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    artifact = load_artifact(out)
    artifact.check_fits(checkpoint_identity(demo_checkpoint))
    assert artifact.method["layer"] == 14 and artifact.datasets["harmful_train"]["count"] == 4
    assert out.with_suffix(".layers.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["directions", "inspect", str(out), "--model", str(demo_checkpoint)]) == 0
    assert "fits" in capsys.readouterr().out


def test_committed_direction_removes_refusals(demo_checkpoint: Path, demo_direction: Path) -> None:
    artifact = load_artifact(demo_direction)
    artifact.check_fits(checkpoint_identity(demo_checkpoint))
    harmful = load_instructions(REPO / "bench/data/jbb_harmful.csv")[:CANDIDATES]
    harmless = load_instructions(REPO / "bench/data/harmless_test.json")[:2]
    model, tokenizer = load_model(demo_checkpoint)
    evaluator = Evaluator(model, tokenizer, harmful, harmless, batch_size=6, max_new_tokens=12)
    baseline = evaluator.run(artifact, "committed", 0.0)
    ablated = evaluator.run(artifact, "committed", 1.0)
    refused = [i for i, text in enumerate(baseline.completions) if is_refusal(text)]
    still_refused = [i for i in refused if is_refusal(ablated.completions[i])]
    assert len(refused) >= 2, baseline.completions
    assert len(still_refused) <= len(refused) // 2, ablated.completions
    assert 0 < ablated.kl < 1.0
