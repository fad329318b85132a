"""``export``: the orthogonalised checkpoint on disk behaves like the hooks (docs/MATHS.md),
including a tied embedding (lm_head must not change) and biases on the writers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import checkpoint, random_directions

from abliserve.bank import DirectionBank
from abliserve.directions.artifact import ArtifactError, DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.export import export_checkpoint
from abliserve.directions.identity import checkpoint_identity
from abliserve.hooks import AblationHooks
from abliserve.projection import site_names

TOKENS = torch.tensor([[3, 4, 11, 12, 13, 14, 15, 2, 3, 5]])


def artifact_for(folder: Path) -> DirectionArtifact:
    identity = checkpoint_identity(folder)
    sites = len(site_names(identity.num_layers))
    return DirectionArtifact(
        directions=random_directions(sites, identity.hidden_size),
        weights=torch.linspace(1.2, 0.3, sites),
        model=identity,
    )


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize(("variant", "alpha"), [("llama-tied-bias", 1.0), ("qwen2-tied", 0.5)])
def test_exported_checkpoint_equals_hooks(tmp_path: Path, variant: str, alpha: float) -> None:
    source = checkpoint(tmp_path / "source", variant)
    artifact = artifact_for(source)
    out = export_checkpoint(source, artifact, alpha, tmp_path / "baked", "test direction")

    original = load(source)
    bank = DirectionBank.from_artifacts({"d": artifact}, *artifact.directions.shape)
    with AblationHooks(original, bank) as hooks, torch.no_grad():
        hooks.set_uniform(1, alpha, 1)
        hooked = original(TOKENS).logits
    baked = load(out)
    with torch.no_grad():
        torch.testing.assert_close(baked(TOKENS).logits, hooked, rtol=1e-4, atol=1e-5)

    # Untied: the output vocabulary is the original embedding, the input embedding is ablated.
    assert baked.config.tie_word_embeddings is False
    assert torch.equal(baked.lm_head.weight, original.model.embed_tokens.weight)
    assert not torch.equal(baked.model.embed_tokens.weight, original.model.embed_tokens.weight)
    if variant == "llama-tied-bias":
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            before = original.model.layers[0].get_submodule(name).bias
            after = baked.model.layers[0].get_submodule(name).bias
            assert not torch.allclose(before, after)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".baked*"))


def test_export_refuses_an_artifact_for_another_model(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "source", "llama")
    other = checkpoint(tmp_path / "other", "llama", seed=7)
    with pytest.raises(ArtifactError) as error:
        export_checkpoint(source, artifact_for(other), 1.0, tmp_path / "baked", "other.st")
    assert "other" in str(error.value) and "source" in str(error.value)
    assert not (tmp_path / "baked").exists()
    assert not list(tmp_path.glob(".baked*"))


def test_export_never_overwrites(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "source", "llama")
    (tmp_path / "baked").mkdir()
    with pytest.raises(DirectionError, match="already exists"):
        export_checkpoint(source, artifact_for(source), 1.0, tmp_path / "baked", "d")
