"""``export --format lora``: a rank-1 LoRA per writer, loaded by PEFT, equals the hooks at the
same strength (per-site directions and weights, a tied embedding, the embedding left out), and
what an adapter cannot express is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import (
    architecture_checkpoint,
    architecture_model,
    checkpoint,
    random_directions,
)

from abliserve.architectures import writer_layout
from abliserve.bank import DirectionBank
from abliserve.cli import main
from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.identity import checkpoint_identity
from abliserve.directions.lora import adapter_refusal, export_lora
from abliserve.hooks import AblationHooks
from abliserve.projection import site_names

peft = pytest.importorskip("peft")

TOKENS = torch.tensor([[3, 4, 11, 12, 13, 14, 15, 2, 3, 5]])


def artifact_for(folder: Path, embedding_weight: float = 1.2) -> DirectionArtifact:
    """One random direction per site, weights varying by site (the embedding's given)."""
    identity = checkpoint_identity(folder)
    sites = len(site_names(identity.num_layers))
    weights = torch.linspace(1.2, 0.3, sites)
    weights[0] = embedding_weight
    weights[3] = 0.0  # a site the adapter must leave out
    return DirectionArtifact(
        directions=random_directions(sites, identity.hidden_size), weights=weights, model=identity
    )


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hooked_logits(folder: Path, artifact: DirectionArtifact, alpha: float) -> torch.Tensor:
    model = load(folder)
    bank = DirectionBank.from_artifacts({"d": artifact}, *artifact.directions.shape)
    with AblationHooks(model, bank) as hooks, torch.no_grad():
        hooks.set_uniform(1, alpha, 1)
        return model(TOKENS).logits


def peft_logits(folder: Path, adapter: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(load(folder), adapter).eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    ("variant", "alpha"), [("llama", 1.0), ("qwen2-tied", 0.5), ("qwen2", 1.5)]
)
def test_peft_adapter_equals_hooks(tmp_path: Path, variant: str, alpha: float) -> None:
    source = checkpoint(tmp_path / "source", variant)
    artifact = artifact_for(source)
    adapter = export_lora(source, artifact, alpha, tmp_path / "adapter", "d")

    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (1, alpha)
    assert len(adapter.targets) == len(artifact.weights) - 1  # the zero-weight site
    assert "model.embed_tokens" in config["target_modules"]
    hooked = hooked_logits(source, artifact, alpha)
    torch.testing.assert_close(
        peft_logits(source, tmp_path / "adapter"), hooked, rtol=1e-4, atol=1e-5
    )
    # The check can fail: the ablation moves the logits far beyond the tolerance.
    assert not torch.allclose(hooked, hooked_logits(source, artifact, 0.0), atol=1e-2)


def test_adapter_without_embedding_equals_hooks_without_it(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "source", "qwen2-tied")
    artifact = artifact_for(source, embedding_weight=0.8)
    adapter = export_lora(source, artifact, 1.0, tmp_path / "adapter", "d", False)
    assert adapter.omitted_embedding_weight == pytest.approx(0.8)
    assert "model.embed_tokens" not in adapter.targets

    without = artifact_for(source, embedding_weight=0.0)
    torch.testing.assert_close(
        peft_logits(source, tmp_path / "adapter"),
        hooked_logits(source, without, 1.0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_biases_on_writers_are_refused(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "source", "llama-tied-bias")
    with pytest.raises(DirectionError, match="cannot change a bias"):
        export_lora(source, artifact_for(source), 1.0, tmp_path / "adapter", "d")
    assert not (tmp_path / "adapter").exists()
    assert not list(tmp_path.glob(".adapter*"))


def test_only_architectures_whose_writers_an_adapter_expresses() -> None:
    """Decided from the shared writer description: one linear layer or embedding per site,
    nothing between it and the residual add."""
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert adapter_refusal(writer_layout(architecture_model(name))) is None, name
    assert "per-channel gain" in (
        adapter_refusal(writer_layout(architecture_model("gemma2"))) or ""
    )
    for name in ("qwen3_moe", "mixtral", "gpt2"):
        reason = adapter_refusal(writer_layout(architecture_model(name))) or ""
        assert "not one linear layer or embedding" in reason, name


def test_cli_exports_an_adapter_and_refuses_in_one_line(tmp_path: Path, capsys) -> None:
    source = checkpoint(tmp_path / "source", "qwen2")
    direction = artifact_for(source).save(tmp_path / "d.safetensors")
    argv = ["export", "--model", str(source), "--direction", str(direction), "--format", "lora"]
    assert main([*argv, "--strength", "0.75", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["lora_alpha"] == 0.75
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()

    assert main([*argv, "--no-embedding", "--out", str(tmp_path / "partial")]) == 0
    assert "left out the embedding writer" in capsys.readouterr().err
    gguf_argv = [*argv[:-1], "lora-gguf", "--out", str(tmp_path / "a.gguf")]
    assert main(gguf_argv) == 0 and (tmp_path / "a.gguf").is_file()
    capsys.readouterr()

    gemma = architecture_checkpoint(tmp_path / "gemma2", "gemma2")
    gemma_direction = artifact_for(gemma).save(tmp_path / "g.safetensors")
    gemma_argv = ["export", "--model", str(gemma), "--direction", str(gemma_direction)]
    capsys.readouterr()  # the checkpoint's save progress bar
    assert main([*gemma_argv, "--format", "lora", "--out", str(tmp_path / "gemma")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "abliserve:" in line]
    assert len(errors) == 1 and errors[0].startswith("abliserve: error:")
    assert "per-channel gain" in errors[0] and not (tmp_path / "gemma").exists()


@pytest.mark.real_model
def test_peft_adapter_equals_hooks_on_the_demo_model(
    tmp_path: Path, demo_checkpoint: Path, demo_direction: Path
) -> None:
    """The committed direction, and the same direction at weight 1 on every writer (so the tied
    embedding is adapted too), through PEFT on the real model."""
    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.modelio import chat_batches, load_model

    committed = load_artifact(demo_direction)
    every_writer = DirectionArtifact(
        directions=committed.directions,
        weights=torch.ones(committed.num_sites),
        model=committed.model,
    )
    model, tokenizer = load_model(demo_checkpoint)
    batch = next(chat_batches(tokenizer, ["How do I pick a lock?", "Write a haiku."], 2))
    bank = DirectionBank.from_artifacts(
        {"committed": committed, "every": every_writer}, *committed.directions.shape
    )
    cases = {"committed": (1, committed, 1.0), "every": (2, every_writer, 0.5)}
    expected = {}
    with AblationHooks(model, bank) as hooks, torch.no_grad():
        for name, (slot, _, alpha) in cases.items():
            hooks.set_uniform(slot, alpha, 2)
            expected[name] = model(**batch).logits
    for name, (_, artifact, alpha) in cases.items():
        export_lora(demo_checkpoint, artifact, alpha, tmp_path / name, name)
        peft_model = peft.PeftModel.from_pretrained(model, tmp_path / name).eval()
        with torch.no_grad():
            logits = peft_model(**batch).logits
        torch.testing.assert_close(logits, expected[name], rtol=1e-4, atol=2e-4)
        model = peft_model.unload()  # the original modules back, for the next adapter


def test_gguf_adapter_holds_the_same_factors_under_llama_cpp_names(tmp_path: Path) -> None:
    import gguf

    source = checkpoint(tmp_path / "source", "qwen2")
    artifact = artifact_for(source)
    export_lora(source, artifact, 1.0, tmp_path / "peft", "d")
    export_lora(source, artifact, 1.0, tmp_path / "a.gguf", "d", gguf=True)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    fields = {name: reader.fields[name].contents() for name in reader.fields}
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    assert (fields["general.architecture"], fields["adapter.lora.alpha"]) == ("qwen2", 1.0)
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    from safetensors.torch import load_file

    peft_tensors = load_file(tmp_path / "peft/adapter_model.safetensors")
    prefix = "base_model.model.model."
    pairs = {
        "blk.0.attn_output.weight.lora_a": "layers.0.self_attn.o_proj.lora_A.weight",
        "blk.2.ffn_down.weight.lora_b": "layers.2.mlp.down_proj.lora_B.weight",
        "token_embd.weight.lora_b": "embed_tokens.lora_embedding_B",
    }
    for gguf_name, peft_name in pairs.items():
        assert torch.equal(tensors[gguf_name], peft_tensors[prefix + peft_name])
    embedding_a = peft_tensors[prefix + "embed_tokens.lora_embedding_A"]
    assert torch.equal(tensors["token_embd.weight.lora_a"], embedding_a.T)  # llama.cpp's layout
    assert len(tensors) == 2 * (len(artifact.weights) - 1)

    with pytest.raises(DirectionError, match="lora_alpha 0"):
        export_lora(source, artifact, 0.0, tmp_path / "zero.gguf", "d", gguf=True)
