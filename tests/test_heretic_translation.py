"""bench/heretic/translate.py: a heretic trial becomes the artifact that makes heretic's edit.

heretic's edit of a writer is the rank-1 LoRA delta ``W + (-w v)(v^T W)``; written out here by
hand on a tiny random case and compared with abliserve's ablation of the writer's output under
the translated direction and weight. heretic itself is not needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "heretic"))
from translate import global_direction, heretic_site_tensors, layer_weight

from abliserve.projection import ablate

LAYERS, HIDDEN = 4, 6
PARAMETERS = {
    "attn.o_proj": {
        "max_weight": 1.2,
        "max_weight_position": 2.0,
        "min_weight": 0.3,
        "min_weight_distance": 1.5,
    },
    "mlp.down_proj": {
        "max_weight": 0.9,
        "max_weight_position": 0.5,
        "min_weight": 0.0,
        "min_weight_distance": 3.0,
    },
}


def _directions() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(
        torch.randn(LAYERS + 1, HIDDEN, generator=generator), dim=1
    )


def test_weight_kernel_matches_hand_computed_values():
    attention = PARAMETERS["attn.o_proj"]
    assert [layer_weight(layer, attention) for layer in range(LAYERS)] == pytest.approx(
        [0.0, 1.2 + (1 / 1.5) * (0.3 - 1.2), 1.2, 1.2 + (1 / 1.5) * (0.3 - 1.2)]
    )
    mlp = PARAMETERS["mlp.down_proj"]
    assert [layer_weight(layer, mlp) for layer in range(LAYERS)] == pytest.approx(
        [0.9 - 0.5 / 3 * 0.9, 0.9 - 0.5 / 3 * 0.9, 0.9 - 1.5 / 3 * 0.9, 0.9 - 2.5 / 3 * 0.9]
    )


def test_global_direction_interpolates_between_neighbouring_residuals():
    refusal = _directions()
    # direction_index 1.25: a quarter of the way from R[2] (layer 1's output) to R[3].
    expected = 0.75 * refusal[2] + 0.25 * refusal[3]
    assert torch.allclose(global_direction(refusal, 1.25), expected / expected.norm(), atol=1e-6)


@pytest.mark.parametrize("direction_index", [None, 1.25])
def test_translated_artifact_reproduces_heretics_weight_edit(direction_index):
    refusal = _directions()
    directions, weights = heretic_site_tensors(refusal, direction_index, PARAMETERS)
    assert directions.shape == (2 * LAYERS + 1, HIDDEN) and weights.shape == (2 * LAYERS + 1,)
    assert weights[0] == 0 and not directions[0].any()  # heretic never edits the embedding
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, generator=generator)
    for layer in range(LAYERS):
        for offset, component in enumerate(("attn.o_proj", "mlp.down_proj")):
            site = 1 + 2 * layer + offset
            weight = torch.randn(HIDDEN, 3, generator=generator)  # [out, in]
            v = refusal[layer + 1] if direction_index is None else global_direction(refusal, 1.25)
            w = layer_weight(layer, PARAMETERS[component])
            lora_a, lora_b = (v @ weight).view(1, -1), (-w * v).view(-1, 1)
            heretic_out = inputs @ (weight + lora_b @ lora_a).T
            abliserve_out = ablate(inputs @ weight.T, directions[site], weights[site])
            assert torch.allclose(abliserve_out, heretic_out, atol=1e-5), (layer, component)
    assert (weights[1::2] > 0).sum() == 3  # attention: layer 0 lies beyond min_weight_distance
