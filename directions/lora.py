"""``abliserve export --format lora``: the ablation as a rank-1 LoRA adapter per writer.

Ablating a writer W at strength alpha is ``(I - alpha w r r^T) W = W + alpha * (-w r)(r^T W)``,
a rank-1 update (:func:`abliserve.projection.rank_one_ablation`). A PEFT LoRA adapter with
``A = r^T W``, ``B = -w r`` (site weight w folded into B), ``r = 1`` and ``lora_alpha = alpha``
(PEFT's scaling is ``lora_alpha / r``) therefore *is* the ablation, exactly. Engines with
per-request LoRA (vLLM, SGLang, PEFT) can then serve the baseline and the ablated model from one
copy of the weights without abliserve's plugin.

What an adapter cannot do, and what this module does about it:

* change a bias: a writer with a bias writes ``b . r`` along r whatever the input; checkpoints
  whose active writers have biases are refused (``abliserve export`` bakes biases instead);
* ablate after a norm: where a per-channel-gain norm sits between a projection and the residual
  add (Gemma 2/3 post-norms), no update of the projection's weight removes the component the
  norm writes; such architectures are refused, naming why;
* be loaded everywhere: some engines cannot load a LoRA on the embedding (vLLM 0.32 for Qwen2),
  so ``include_embedding=False`` leaves that writer out and says how much weight it had.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from abliserve.architectures import WriterLayout, check_checkpoint, writer_layout
from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.identity import checkpoint_identity
from abliserve.projection import rank_one_ablation

PEFT_PREFIX = "base_model.model."
ADAPTABLE = (nn.Linear, nn.Embedding)  # what a rank-1 PEFT LoRA can sit on


def adapter_refusal(layout: WriterLayout) -> str | None:
    """Why a weight-update adapter cannot express the ablation of a model whose writers are
    ``layout`` (the shared per-architecture description), or None.

    A rank-1 LoRA adds ``B A x`` to one linear layer's (or embedding's) output, so it is the
    exact ablation only where that output is itself what is added to the residual stream.
    """
    for site in layout.sites:
        name = ", ".join(site.names)
        if site.normalised_branch is not None:
            return (
                f"{name} normalises its branch's output with a per-channel gain before the "
                "residual add, so the writer is the norm's output and no update of the "
                "projection's weight removes its component along the direction; serve it with "
                "the abliserve plugin, or `abliserve export` for a marked approximation"
            )
        if len(site.modules) != 1 or not isinstance(site.modules[0], ADAPTABLE):
            kind = " + ".join(type(module).__name__ for module in site.modules)
            return (
                f"the writer {name} is a {kind}, not one linear layer or embedding a LoRA "
                "adapter can sit on (a whole MoE block, several embeddings, a fused "
                "projection); serve it with the abliserve plugin or bake it with "
                "`abliserve export`"
            )
    return None


@dataclass(frozen=True)
class Adapter:
    """The ablation adapter of one checkpoint, before it is written in some file format.

    tensors: PEFT state dict (float32), strength excluded; targets: adapted module names;
    omitted_embedding_weight: site weight of an embedding writer left out (0 if none).
    """

    tensors: dict[str, torch.Tensor]
    targets: list[str]
    omitted_embedding_weight: float
    model_type: str
    num_layers: int


@torch.no_grad()
def adapter_tensors(
    model: torch.nn.Module,
    directions: torch.Tensor,
    weights: torch.Tensor,
    include_embedding: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str], float]:
    """PEFT state dict of the ablation adapter (float32), its target modules, and the site weight
    of an embedding writer left out (0 if none). Strength is not in the tensors: it is the
    adapter's scaling, so one set of tensors serves every strength an engine can scale to."""
    names = {id(module): name for name, module in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    omitted = 0.0
    writers = [writer.modules[0] for writer in writer_layout(model).sites]  # one each: checked
    for site, module in enumerate(writers):
        site_weight = float(weights[site])
        direction = directions[site]
        if site_weight == 0.0 or not bool(direction.any()):
            continue
        name = names[id(module)]
        if getattr(module, "bias", None) is not None:
            raise DirectionError(
                f"{name} has a bias, and a LoRA adapter cannot change a bias (its component "
                "along the direction would stay); bake the ablation with `abliserve export` "
                "(the default checkpoint format) instead"
            )
        embedding = site == 0
        if embedding and not include_embedding:
            omitted = site_weight
            continue
        down, up = rank_one_ablation(module.weight, direction, outputs_on_rows=embedding)
        up = site_weight * up
        key = PEFT_PREFIX + name
        if embedding:
            tensors[f"{key}.lora_embedding_A"] = down.float().contiguous()
            tensors[f"{key}.lora_embedding_B"] = up.float().contiguous()
        else:
            tensors[f"{key}.lora_A.weight"] = down.float().contiguous()
            tensors[f"{key}.lora_B.weight"] = up.float().contiguous()
        targets.append(name)
    if not targets:
        raise DirectionError("the direction has no writer left to adapt (all site weights are 0)")
    return tensors, targets, omitted


def build_adapter(
    checkpoint: Path, artifact: DirectionArtifact, artifact_name: str, include_embedding: bool
) -> Adapter:
    """Check the artifact fits and the architecture can be adapted, then build the adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    artifact.check_fits(checkpoint_identity(checkpoint), artifact_name)
    check_checkpoint(checkpoint, None)  # unknown architectures: one line naming the known
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto").eval()
    if (reason := adapter_refusal(writer_layout(model))) is not None:
        raise DirectionError(f"cannot export a LoRA adapter: {reason}")
    tensors, targets, omitted = adapter_tensors(
        model, artifact.directions, artifact.weights, include_embedding
    )
    return Adapter(tensors, targets, omitted, config.model_type, config.num_hidden_layers)


def adapter_config(base_model: str, alpha: float, targets: list[str]) -> dict:
    """PEFT ``adapter_config.json``: rank 1 and ``lora_alpha = alpha`` make the scaling alpha."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": 1,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft(adapter: Adapter, base_model: str, alpha: float, folder: Path, note: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` in ``folder``."""
    config = adapter_config(base_model, alpha, adapter.targets)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(
        adapter.tensors,
        folder / "adapter_model.safetensors",
        metadata={"format": "pt", "abliserve": note},
    )


def export_lora(
    checkpoint: Path,
    artifact: DirectionArtifact,
    alpha: float,
    out: Path,
    artifact_name: str,
    include_embedding: bool = True,
    gguf: bool = False,
) -> Adapter:
    """Write the ablation at ``alpha`` as a PEFT adapter folder for ``checkpoint`` (or, with
    ``gguf``, one llama.cpp LoRA GGUF file).

    Built in a temporary sibling and renamed into place, so ``out`` is complete or absent.
    """
    # Imported here: lora_gguf builds on this module.
    from abliserve.directions.lora_gguf import check_gguf_strength, write_gguf

    if out.exists():
        raise DirectionError(f"--out {out} already exists; choose a new name")
    if gguf:
        check_gguf_strength(alpha)
    adapter = build_adapter(checkpoint, artifact, artifact_name, include_embedding)
    note = f"{artifact_name} at strength {alpha:g}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if gguf:
            write_gguf(adapter, alpha, staging / out.name)
            os.replace(staging / out.name, out)
        else:
            write_peft(adapter, str(checkpoint), alpha, staging, note)
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return adapter
