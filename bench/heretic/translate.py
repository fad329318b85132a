"""heretic's abliteration parameters as an abliserve direction artifact.

heretic (1.4, ``row_normalization = "none"``) edits every attention ``o_proj`` and MLP
``down_proj`` of decoder layer ``i`` by a rank-1 LoRA adapter ``W <- W - w v v^T W``, i.e. it
removes ``w`` times the component of the writer's output along the unit vector ``v``. That is
abliserve's ablation at strength 1 with site weight ``w`` and site direction ``v``
(docs/MATHS.md), so a trial translates exactly:

- ``v``: with a ``direction_index`` (heretic's "global" scope), the unit-normalised linear
  interpolation between heretic's per-layer directions ``R[floor(d) + 1]`` and
  ``R[floor(d) + 2]`` (index 0 of ``R`` is the embedding output) at fraction ``d - floor(d)``, for
  every site; without one ("per layer"), layer ``i``'s writers use ``R[i + 1]``, the direction of
  the residual they write into.
- ``w`` for layer ``i`` and component c: distance ``|i - max_weight_position_c|``; zero beyond
  ``min_weight_distance_c``, else linear from ``max_weight_c`` (distance 0) to ``min_weight_c``
  (at ``min_weight_distance_c``). heretic stores ``min_weight`` already multiplied by
  ``max_weight``.
- The embedding is never edited by heretic: its site is a zero row with weight 0.

Used in abliserve's environment by bench/heretic/evaluate_fronts.sh; heretic itself is not needed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.directions.identity import checkpoint_identity
from abliserve.projection import site_names

# heretic's component names -> the site offset within a layer in abliserve's canonical order.
COMPONENT_OFFSETS = {"attn.o_proj": 0, "mlp.down_proj": 1}


def global_direction(refusal_directions: torch.Tensor, direction_index: float) -> torch.Tensor:
    """heretic's interpolated direction for a fractional layer index (its ``Model.abliterate``)."""
    fraction, index = math.modf(direction_index + 1)
    mixed = refusal_directions[int(index)].lerp(refusal_directions[int(index) + 1], fraction)
    return torch.nn.functional.normalize(mixed, p=2, dim=0)


def layer_weight(layer: int, parameters: dict[str, float]) -> float:
    """heretic's linear weight kernel for one component at one layer (0 = not edited)."""
    distance = abs(layer - parameters["max_weight_position"])
    if distance > parameters["min_weight_distance"]:
        return 0.0
    return parameters["max_weight"] + (distance / parameters["min_weight_distance"]) * (
        parameters["min_weight"] - parameters["max_weight"]
    )


def heretic_site_tensors(
    refusal_directions: torch.Tensor,
    direction_index: float | None,
    parameters: dict[str, dict[str, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Artifact tensors (directions [S, hidden], weights [S]) for one heretic trial.

    refusal_directions: [layers + 1, hidden] heretic's unit directions, index 0 = embedding.
    parameters: heretic's per-component ``AbliterationParameters`` as stored in the trial.
    """
    num_layers = refusal_directions.shape[0] - 1
    hidden = refusal_directions.shape[1]
    shared = (
        None if direction_index is None else global_direction(refusal_directions, direction_index)
    )
    directions = torch.zeros(len(site_names(num_layers)), hidden, dtype=torch.float32)
    weights = torch.zeros(len(site_names(num_layers)), dtype=torch.float32)
    for layer in range(num_layers):
        for component, offset in COMPONENT_OFFSETS.items():
            site = 1 + 2 * layer + offset
            directions[site] = refusal_directions[layer + 1] if shared is None else shared
            weights[site] = layer_weight(layer, parameters[component])
    return directions, weights


def trial_artifact(
    refusal_directions: torch.Tensor, trial: dict, identity: ModelIdentity, version: str
) -> DirectionArtifact:
    """One heretic trial (a ``front.json`` record) as an abliserve artifact."""
    directions, weights = heretic_site_tensors(
        refusal_directions, trial["direction_index"], trial["parameters"]
    )
    return DirectionArtifact(
        directions=directions,
        weights=weights,
        model=identity,
        method={
            "name": "heretic",
            "heretic_version": version,
            "trial": trial["index"],
            "direction_index": trial["direction_index"],
            "parameters": trial["parameters"],
        },
        scores={
            "heretic_refusals": trial["refusals"],
            "heretic_bad_prompts": trial["n_bad_prompts"],
            "heretic_kl_divergence": trial["kl_divergence"],
        },
    )


def main(run_dir: str, out_dir: str, checkpoint: str) -> None:
    """Write ``OUT/heretic-tN.safetensors`` for every trial on heretic's front in RUN/front.json."""
    run = Path(run_dir)
    front = json.loads((run / "front.json").read_text())
    refusal_directions = load_file(run / "refusal_directions.safetensors")["refusal_directions"]
    identity = checkpoint_identity(Path(checkpoint))
    version = front.get("version", "unknown")
    for trial in front["front"]:
        path = Path(out_dir, f"heretic-t{trial['index']}.safetensors")
        trial_artifact(refusal_directions, trial, identity, version).save(path)
        print(
            f"{path}: heretic refusals {trial['refusals']}/{trial['n_bad_prompts']}, "
            f"KL {trial['kl_divergence']:.4f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:4])
