"""``directions compute|inspect|evaluate`` and ``export`` on a post-norm (Gemma 2) and a sparse
MoE (Qwen3-MoE) tiny checkpoint, and the start-up refusals as one line and exit 2: an unknown
architecture without ``--writers``, and writers named wrongly (the self-check)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_directions_cli import HARMFUL, HARMLESS
from tiny_models import architecture_checkpoint

from abliserve.cli import main
from abliserve.directions.artifact import load_artifact

LLAMA_WRITERS = (
    "embed=model.embed_tokens,attn=model.layers.{i}.self_attn.o_proj,"
    "mlp=model.layers.{i}.mlp.down_proj"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("architecture_cli")
    (root / "harmful.txt").write_text("\n".join(HARMFUL))
    (root / "harmless.json").write_text(json.dumps([{"instruction": t} for t in HARMLESS]))
    return root


def _prompts(root: Path) -> list[str]:
    return [
        "--harmful-train", str(root / "harmful.txt"),
        "--harmless-train", str(root / "harmless.json"),
        "--harmful-val", str(root / "harmful.txt"),
        "--harmless-val", str(root / "harmless.json"),
        "--val-count", "2", "--batch-size", "4",
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "exact"), [("gemma2", False), ("qwen3_moe", True)])
def test_directions_pipeline(root: Path, name: str, exact: bool, capsys) -> None:
    model = architecture_checkpoint(root / name, name)
    out = root / f"{name}.safetensors"
    assert main(["directions", "compute", "--model", str(model), "--out", str(out),
                 *_prompts(root)]) == 0  # fmt: skip
    assert load_artifact(out).num_sites == 5
    assert main(["directions", "inspect", str(out), "--model", str(model)]) == 0
    assert "fits" in capsys.readouterr().out
    report = root / f"{name}.json"
    assert main([
        "directions", "evaluate", "--model", str(model), "--direction", str(out),
        "--strengths", "1", "--harmful", str(root / "harmful.txt"),
        "--harmless", str(root / "harmless.json"), "--max-new-tokens", "3", "--json", str(report),
    ]) == 0  # fmt: skip
    assert json.loads(report.read_text())["conditions"][1]["kl"] > 0
    baked = root / f"{name}-baked"
    assert main(["export", "--model", str(model), "--direction", str(out),
                 "--out", str(baked)]) == 0  # fmt: skip
    recorded = json.loads((baked / "config.json").read_text())["abliserve_export"]
    assert recorded["exact"] is exact and bool(recorded["approximate_writers"]) is not exact


def _one_line_error(capsys) -> str:
    """The last line on stderr (progress bars of model loading come first)."""
    error = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert error.startswith("abliserve: error: ")
    return error


def test_unknown_architecture_needs_writers(root: Path, capsys) -> None:
    model = root / "unknown"
    shutil.copytree(architecture_checkpoint(root / "llama", "llama"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["MyLlama"]}))
    out = root / "unknown.safetensors"
    capsys.readouterr()  # the checkpoint writer's progress bars
    compute = ["directions", "compute", "--model", str(model), "--out", str(out), *_prompts(root)]
    assert main(compute) == 2
    assert "MyLlama is not supported (supported: LlamaForCausalLM" in _one_line_error(capsys)
    assert main(["serve", "--model", str(model), "--engine", "transformers"]) == 2
    assert "--writers" in _one_line_error(capsys)
    assert main([*compute, "--writers", LLAMA_WRITERS]) == 0


def test_misnamed_writers_are_refused_by_the_self_check(root: Path, capsys) -> None:
    model = architecture_checkpoint(root / "gemma2-misnamed", "gemma2")
    gemma_before_norms = LLAMA_WRITERS  # o_proj / down_proj: before Gemma's post-norms
    capsys.readouterr()
    assert main(["directions", "compute", "--model", str(model), "--out", str(root / "x.st"),
                 "--writers", gemma_before_norms, *_prompts(root)]) == 2  # fmt: skip
    assert "self-check failed: after decoder layer 0" in _one_line_error(capsys)
