"""``abliserve directions optimize`` on the real demo model (``real_model``; under a minute):
one round of two candidates through the transformers engine on a handful of prompts, and each
Pareto point's reported validation scores reproduced by the offline evaluator
(``directions evaluate``'s hooks) from the written artifact alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliserve.cli import main
from abliserve.datasets import default_path, load_instructions
from abliserve.directions.artifact import load_artifact
from abliserve.directions.evaluate import Evaluator
from abliserve.directions.modelio import load_model

pytestmark = pytest.mark.real_model
TOKENS = 8


def test_front_scores_are_what_the_artifacts_do(demo_checkpoint: Path, tmp_path: Path) -> None:
    sets = {
        "harmful-train": load_instructions(default_path("harmful_train"))[:8],
        "harmless-train": load_instructions(default_path("harmless_train"))[:8],
        "harmful-val": load_instructions(default_path("harmful_val"))[:4],
        "harmless-val": load_instructions(default_path("harmless_val"))[:3],
    }
    argv = ["directions", "optimize", "--model", str(demo_checkpoint)]
    for name, texts in sets.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(texts))
        argv += [f"--{name}", str(tmp_path / f"{name}.json")]
    argv += [
        "--engine", "transformers", "--dtype", "float32", "--study", str(tmp_path / "s.journal"),
        "--out", str(tmp_path / "front"), "--trials", "2", "--batch", "2", "--train-count", "8",
        "--kl-count", "3", "--max-new-tokens", str(TOKENS), "--batch-size", "8",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "front" / "pareto.json").read_text())
    assert summary["trials"] == 2 and summary["front"]
    assert summary["baseline"]["refusal_rate"] > 0  # the model refuses some of these

    model, tokenizer = load_model(demo_checkpoint)
    evaluator = Evaluator(
        model, tokenizer, sets["harmful-val"], sets["harmless-val"], 4, max_new_tokens=TOKENS
    )
    for row in summary["front"]:
        condition = evaluator.run(load_artifact(row["artifact"]), "point", 1.0)
        assert condition.refusal_rate == row["refusal_rate"]
        assert condition.kl == pytest.approx(row["kl"], rel=0.05, abs=1e-4)
