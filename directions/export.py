"""``abliserve export``: bake the ablation into the weights (docs/MATHS.md).

Every writer's output weights (and biases) become ``(I - alpha w_k r_k r_k^T) W`` through the
functions of :mod:`abliserve.projection` the hooks' maths comes from, so where the writer is a
linear map of its inputs (embeddings, attention and dense MLP output projections, every expert's
down projection plus a shared expert for MoE blocks: gating only scales them) the exported
checkpoint at alpha is the hooks at alpha, with zero serving overhead.

Where the writer is a norm after the projection (Gemma 2/3's post-norms), no weight edit is
exact: ``norm(x) . r = (x . (g*r)) / rms(x)``, so the projection is orthogonalised against the
unit ``g*r`` instead. That removes the r-component of what is written at alpha = 1, but writes a
different vector than the serving-time ablation; the checkpoint's ``config.json`` says so under
``abliserve_export`` (docs/ARCHITECTURES.md has the measured difference). A tied ``lm_head`` is
untied first: baking into the shared embedding matrix would otherwise also rotate the output
vocabulary.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from abliserve.architectures import (
    OUTPUT_PROJECTIONS,
    WriterSite,
    WriterSpec,
    check_checkpoint,
    writer_layout,
)
from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.identity import checkpoint_identity
from abliserve.models import SOURCE_FILE, model_display_id
from abliserve.projection import (
    normalise,
    orthogonalise_bias,
    orthogonalise_embedding,
    orthogonalise_output_weight,
)
from abliserve.selfcheck import check_writers

EXPORT_CONFIG_KEY = "abliserve_export"


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
    model: nn.Module,
    directions: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    writers: WriterSpec | None = None,
) -> list[str]:
    """Bake ablation at strength ``alpha`` into ``model`` in place (site k at ``alpha * w_k``).

    Returns the writers baked only approximately (post-norm sites), empty when exact.
    """
    untie_embeddings(model)
    approximate = []
    for site, writer in enumerate(writer_layout(model, writers).sites):
        site_alpha = alpha * float(weights[site])
        direction = directions[site]
        if site_alpha == 0.0 or not bool(direction.any()):
            continue
        if writer.normalised_branch is not None:
            _bake_branch(
                writer.normalised_branch, _pre_norm_direction(writer, direction), site_alpha
            )
            approximate += writer.names
            continue
        for module, name in zip(writer.modules, writer.names, strict=True):
            if writer.kind == "embed":
                module.weight.copy_(orthogonalise_embedding(module.weight, direction, site_alpha))
            elif not _bake_branch(module, direction, site_alpha):
                raise DirectionError(f"cannot export {name}: no output projection found in it")
    return approximate


def _pre_norm_direction(writer: WriterSite, direction: torch.Tensor) -> torch.Tensor:
    """Unit ``g * r`` for a post-RMSNorm writer with effective gain ``g`` (the norm of a vector
    of ones is its gain up to a scalar, whatever its gain convention)."""
    norm = writer.modules[0]
    if getattr(norm, "bias", None) is not None:
        raise DirectionError(f"cannot export {writer.names[0]}: a post-norm with a bias")
    parameter = next(norm.parameters())
    gain = norm(torch.ones(1, direction.shape[-1], dtype=parameter.dtype)).double()[0]
    return normalise(gain * direction.double())


def _bake_branch(branch: nn.Module, direction: torch.Tensor, alpha: float) -> bool:
    """Orthogonalise every output projection (and bias) of ``branch``; False if it has none."""
    found = False
    for name, module in branch.named_modules():
        if module is branch or name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS:
            found |= _bake_linear(module, direction, alpha)
    for name, parameter in branch.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        if parameter.dim() == 3 and leaf in OUTPUT_PROJECTIONS:  # fused experts [E, ., .]
            transposed = getattr(branch.get_submodule(owner_name), "is_transposed", False)
            for expert in parameter:
                weight = expert.T if transposed else expert
                weight.copy_(orthogonalise_output_weight(weight, direction, alpha))
            bias = getattr(branch.get_submodule(owner_name), f"{leaf}_bias", None)
            if bias is not None:
                bias.copy_(orthogonalise_bias(bias, direction, alpha))
            found = True
    return found


def _bake_linear(module: nn.Module, direction: torch.Tensor, alpha: float) -> bool:
    if isinstance(module, nn.Linear):
        module.weight.copy_(orthogonalise_output_weight(module.weight, direction, alpha))
    elif type(module).__name__ == "Conv1D":  # GPT-2's linear layer stores [in, out]
        module.weight.copy_(orthogonalise_output_weight(module.weight.T, direction, alpha).T)
    else:
        return False
    if getattr(module, "bias", None) is not None:
        module.bias.copy_(orthogonalise_bias(module.bias, direction, alpha))
    return True


def export_checkpoint(
    checkpoint: Path,
    artifact: DirectionArtifact,
    alpha: float,
    out: Path,
    artifact_name: str,
    writers: WriterSpec | None = None,
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
    check_checkpoint(checkpoint, writers)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").eval()
    check_writers(model, writers)  # never bake an ablation the writers do not capture
    approximate = orthogonalise_model(model, artifact.directions, artifact.weights, alpha, writers)
    setattr(
        model.config,
        EXPORT_CONFIG_KEY,
        {"strength": alpha, "exact": not approximate, "approximate_writers": approximate},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(
            f"{model_display_id(checkpoint)}-ablated-{alpha:g} exported by abliserve from "
            f"{checkpoint} with {artifact_name} at strength {alpha:g}"
            f"{'' if not approximate else ' (approximate: post-norm writers)'}\n"
        )
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
