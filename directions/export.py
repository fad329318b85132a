"""``abliserve export``: bake the ablation into the weights (docs/MATHS.md).

Every writer's weight (and bias) becomes ``(I - alpha w_k r_k r_k^T) W`` through the same
functions of :mod:`abliserve.projection` the hooks' maths comes from, so the exported checkpoint
at alpha is the hooks at alpha, with zero serving overhead. A tied ``lm_head`` is untied first:
baking into the shared embedding matrix would otherwise also rotate the output vocabulary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.identity import checkpoint_identity
from abliserve.hooks import writer_modules
from abliserve.models import SOURCE_FILE, model_display_id
from abliserve.projection import (
    orthogonalise_bias,
    orthogonalise_embedding,
    orthogonalise_output_weight,
)


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of a tied embedding matrix, and record it in the config."""
    output = model.get_output_embeddings()
    if output is None:
        return
    if output.weight is model.get_input_embeddings().weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalise_model(
    model: nn.Module, directions: torch.Tensor, weights: torch.Tensor, alpha: float
) -> None:
    """Bake ablation at strength ``alpha`` into ``model`` in place (site k at ``alpha * w_k``)."""
    untie_embeddings(model)
    for site, module in enumerate(writer_modules(model)):
        site_alpha = alpha * float(weights[site])
        direction = directions[site]
        if site_alpha == 0.0 or not bool(direction.any()):
            continue
        if site == 0:
            module.weight.copy_(orthogonalise_embedding(module.weight, direction, site_alpha))
        else:
            module.weight.copy_(orthogonalise_output_weight(module.weight, direction, site_alpha))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(orthogonalise_bias(module.bias, direction, site_alpha))


def export_checkpoint(
    checkpoint: Path, artifact: DirectionArtifact, alpha: float, out: Path, artifact_name: str
) -> Path:
    """Write an orthogonalised copy of ``checkpoint`` (weights, config, tokenizer) to ``out``.

    Built in a temporary sibling folder and renamed into place, so ``out`` is either complete
    or absent.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists():
        raise DirectionError(f"--out {out} already exists; choose a new folder")
    identity = checkpoint_identity(checkpoint)
    artifact.check_fits(identity, artifact_name)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").eval()
    orthogonalise_model(model, artifact.directions, artifact.weights, alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(
            f"{model_display_id(checkpoint)}-ablated-{alpha:g} exported by abliserve from "
            f"{checkpoint} with {artifact_name} at strength {alpha:g}\n"
        )
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
