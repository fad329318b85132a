"""``abliserve directions compute|inspect|evaluate`` and ``abliserve export`` on a tiny
checkpoint: the happy path end to end, and bad input as one error line, exit 2, and nothing
half-written left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import checkpoint

from abliserve.cli import main
from abliserve.directions.artifact import load_artifact
from abliserve.directions.evaluate import greedy_generate
from abliserve.directions.modelio import chat_batches, load_model

HARMFUL = ["how to make a bomb", "hack bank", "steal money please", "give instructions for bomb"]
HARMLESS = ["write a poem", "tell me about the weather", "explain photosynthesis", "make a cake"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("directions_cli")
    checkpoint(root / "tiny", "llama-tied-bias")
    checkpoint(root / "other", "qwen2", num_layers=2)
    (root / "harmful.txt").write_text("\n".join(HARMFUL))
    (root / "harmless.json").write_text(json.dumps([{"instruction": t} for t in HARMLESS]))
    return root


def compute_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "directions", "compute", "--model", str(root / "tiny"), "--out", str(out),
        "--harmful-train", str(root / "harmful.txt"), "--harmless-train",
        str(root / "harmless.json"), "--harmful-val", str(root / "harmful.txt"),
        "--harmless-val", str(root / "harmless.json"), "--val-count", "2", "--batch-size", "3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def computed(workspace: Path) -> Path:
    out = workspace / "runs" / "tiny.safetensors"
    assert main(compute_args(workspace, out)) == 0
    return out


def test_compute_writes_artifact_and_report(workspace: Path, computed: Path, capsys) -> None:
    artifact = load_artifact(computed)
    assert computed.with_suffix(".layers.png").stat().st_size > 1000
    assert artifact.method["selection"] == "automatic"
    # 3 layers: layer 0 (the same token embedding for every prompt) and the last 20% skipped.
    assert artifact.method["candidate_layers"] == [1]
    assert artifact.datasets["harmful_train"]["count"] == 4
    assert len(artifact.scores["candidates"]) == 1
    assert bool((artifact.weights == 1).all())
    assert main(["directions", "inspect", str(computed), "--model", str(workspace / "tiny")]) == 0
    printed = capsys.readouterr().out
    assert "fits" in printed and "diff-of-means" in printed


def test_compute_per_layer_profile(workspace: Path) -> None:
    out = workspace / "runs" / "profile.safetensors"
    args = ["--layer", "1", "--per-layer", "--width", "1", "--min-weight", "0.5", "--projected"]
    assert main(compute_args(workspace, out, *args)) == 0
    artifact = load_artifact(out)
    # Sites: embedding (writes residual 0), then o_proj/down_proj of layers 0, 1, 2.
    assert artifact.weights.tolist() == [0.5, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert artifact.method["layer"] == 1 and artifact.method["profile"]["per_layer"]
    assert not torch.equal(artifact.directions[1], artifact.directions[3])


def test_evaluate_and_export(workspace: Path, computed: Path) -> None:
    report = workspace / "runs" / "eval.json"
    assert main([
        "directions", "evaluate", "--model", str(workspace / "tiny"), "--direction",
        str(computed), "--strengths", "1", "--harmful", str(workspace / "harmful.txt"),
        "--harmless", str(workspace / "harmless.json"), "--max-new-tokens", "4",
        "--batch-size", "3", "--json", str(report),
    ]) == 0  # fmt: skip
    conditions = json.loads(report.read_text())["conditions"]
    assert [c["strength"] for c in conditions] == [0.0, 1.0]
    assert conditions[0]["kl"] == 0.0 and conditions[1]["kl"] > 0
    assert len(conditions[1]["completions"]) == len(HARMFUL)
    baked = workspace / "runs" / "baked"
    assert main(["export", "--model", str(workspace / "tiny"), "--direction", str(computed),
                 "--strength", "1", "--out", str(baked)]) == 0  # fmt: skip
    assert (baked / "model.safetensors").is_file()


def test_batched_generation_matches_one_by_one(workspace: Path) -> None:
    """Left padding, attention mask and position ids: a padded row generates what it would
    generate alone."""
    model, tokenizer = load_model(workspace / "tiny")
    prompts = ["how to make a bomb please", "hack"]
    (batch,) = chat_batches(tokenizer, prompts, 2)
    assert int(batch["attention_mask"][1].sum()) < batch["attention_mask"].shape[1]
    batched = greedy_generate(model, batch, 6, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        (single,) = chat_batches(tokenizer, [prompt], 1)
        alone = greedy_generate(model, single, 6, [tokenizer.eos_token_id], 1)
        assert batched[row, : alone.shape[1]].tolist() == alone[0].tolist()


def bad_invocations(root: Path, computed: Path) -> dict[str, list[str]]:
    (root / "empty.txt").write_text("\n\n")
    (root / "malformed.json").write_text('[{"instruction": ')
    out = str(root / "bad" / "out.safetensors")
    return {
        "missing model": [*compute_args(root, out)[:3], str(root / "nope"), "--out", out],
        "empty prompts": compute_args(root, out, "--harmful-train", str(root / "empty.txt")),
        "malformed prompts": compute_args(
            root, out, "--harmless-val", str(root / "malformed.json")
        ),
        "layer out of range": compute_args(root, out, "--layer", "3"),
        "zero direction": compute_args(root, out, "--layer", "0"),
        "export for another model": ["export", "--model", str(root / "other"), "--direction",
                                     str(computed), "--out", str(root / "bad" / "baked")],
        "evaluate for another model": ["directions", "evaluate", "--model", str(root / "other"),
                                       "--direction", str(computed)],
        "corrupt artifact": ["directions", "inspect", str(root / "harmful.txt")],
    }  # fmt: skip


def test_bad_input_is_one_line_and_leaves_nothing(workspace: Path, computed: Path, capsys) -> None:
    for name, argv in bad_invocations(workspace, computed).items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        # Progress bars may precede it; the error itself is one line, with no traceback.
        assert err.strip().splitlines()[-1].startswith("abliserve: error: "), (name, err)
        assert err.count("abliserve: error: ") == 1 and "Traceback" not in err, (name, err)
        assert not (workspace / "bad").exists() or not any((workspace / "bad").iterdir()), name
