"""The optimiser's pure parts on synthetic data: direction estimators, the ablation shape
(fractional direction index, tent kernels, site layout) and trial parameters -> artifact."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from abliserve.directions.artifact import ModelIdentity
from abliserve.directions.estimators import (
    Estimator,
    candidate_directions,
    difference,
    harmless_subspace,
)
from abliserve.directions.extract import Activations
from abliserve.directions.shape import AblationShape, Kernel, interpolate, site_tensors
from abliserve.optimize.space import ArtifactBuilder, SearchSpace

LAYERS, HIDDEN = 4, 16


def activations(prompts: int, shift: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(prompts, LAYERS + 1, HIDDEN, generator=generator) + shift


def test_mean_difference_recovers_the_shift() -> None:
    shift = torch.zeros(HIDDEN)
    shift[3] = 5.0
    directions = candidate_directions(
        activations(200, shift, 0), activations(200, 0, 1), Estimator.MEAN
    )
    assert directions.shape == (LAYERS + 1, HIDDEN)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(LAYERS + 1))
    assert bool((directions[:, 3] > 0.95).all())


def test_median_is_robust_to_outliers_where_the_mean_is_not() -> None:
    shift = torch.zeros(HIDDEN)
    shift[3] = 3.0
    harmful = activations(400, shift, 0)
    harmful[:5, :, 7] = 1000.0  # five prompts with an outsized coordinate
    harmless = activations(400, 0, 1)
    mean = candidate_directions(harmful, harmless, Estimator.MEAN)
    median = candidate_directions(harmful, harmless, Estimator.MEDIAN)
    assert bool((mean[:, 7].abs() > 0.9).all())  # the outliers own the mean difference
    assert bool((median[:, 3] > 0.95).all()) and bool((median[:, 7].abs() < 0.2).all())


def test_variance_scaling_discounts_noisy_coordinates() -> None:
    shift = torch.zeros(HIDDEN)
    shift[2] = shift[5] = 1.0
    harmful, harmless = activations(400, shift, 0), activations(400, 0, 1)
    # Coordinate 5 moves as much between the classes but is ten times as noisy.
    harmful[:, :, 5] = (harmful[:, :, 5] - 1) * 10 + 1
    harmless[:, :, 5] *= 10
    scaled = difference(harmful, harmless, Estimator.VARIANCE_SCALED)
    mean = difference(harmful, harmless, Estimator.MEAN)
    assert bool((scaled[:, 2].abs() > 20 * scaled[:, 5].abs()).all())
    assert not bool((mean[:, 2].abs() > 20 * mean[:, 5].abs()).all())


def test_subspace_projection_is_orthogonal_to_the_harmless_subspace() -> None:
    shift = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    harmless = activations(50, 0, 1)
    harmless[:, :, 0] *= 20  # a dominant harmless principal component along coordinate 0
    harmful = activations(50, shift, 0)
    directions = candidate_directions(harmful, harmless, Estimator.MEAN, harmless_rank=3)
    basis = harmless_subspace(harmless, 3)
    assert basis.shape == (LAYERS + 1, 3, HIDDEN)
    assert bool((basis[:, 0, 0].abs() > 0.99).all())
    overlap = torch.einsum("lh,lrh->lr", directions.double(), basis)
    assert float(overlap.abs().max()) < 1e-5
    assert torch.allclose(directions.norm(dim=-1), torch.ones(LAYERS + 1))
    plain = candidate_directions(harmful, harmless, Estimator.MEAN)
    assert float(torch.einsum("lh,lrh->lr", plain.double(), basis).abs().max()) > 0.01


def test_fractional_index_interpolates_neighbours() -> None:
    candidates = torch.eye(3, HIDDEN)  # residual i -> unit vector e_i
    assert torch.equal(interpolate(candidates, 1.0), candidates[1])
    halfway = interpolate(candidates, 0.5)
    assert torch.allclose(halfway[:2], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    quarter = interpolate(candidates, 1.25)
    assert float(quarter[1]) > float(quarter[2]) > 0 and math.isclose(
        float(quarter.norm()), 1.0, rel_tol=1e-6
    )
    with pytest.raises(ValueError):
        interpolate(candidates, 2.5)


def test_tent_kernel_shape() -> None:
    kernel = Kernel(max_weight=1.2, max_weight_position=5.0, min_weight=0.3, min_weight_distance=3)
    assert kernel.weight(5) == pytest.approx(1.2)
    assert kernel.weight(6) == pytest.approx(0.9) == kernel.weight(4)
    assert kernel.weight(8) == pytest.approx(0.3) == kernel.weight(2)
    assert kernel.weight(9) == 0.0 == kernel.weight(1)


def test_site_tensors_layout_per_layer_and_global() -> None:
    candidates = torch.eye(LAYERS + 1, HIDDEN)
    attention = Kernel(1.0, 1.0, 0.5, 1.0)  # layers 0..2: 0.5, 1, 0.5
    mlp = Kernel(1.5, 3.0, 0.0, 2.0)  # layers 1..3: 0, 0.75, 1.5
    per_layer = AblationShape(None, attention, mlp, embedding_weight=0.25)
    directions, weights = site_tensors(candidates, per_layer)
    # sites: embedding, (attention, mlp) of layers 0..3
    assert weights.tolist() == [0.25, 0.5, 0.0, 1.0, 0.0, 0.5, 0.75, 0.0, 1.5]
    assert torch.equal(directions[0], candidates[0])  # embedding writes residual 0
    assert torch.equal(directions[3], candidates[2]) and torch.equal(directions[4], candidates[2])
    shared = AblationShape(2.5, attention, mlp)
    directions, weights = site_tensors(candidates, shared)
    assert weights[0] == 0.0
    assert bool((directions == interpolate(candidates, 2.5)).all(dim=-1).all())
    # A zero candidate (a chat model's residual 0: the same last token for every prompt)
    # removes nothing, and its writer's weight says so.
    candidates[0] = 0.0
    directions, weights = site_tensors(candidates, per_layer)
    assert weights[0] == 0.0 and weights[1:].tolist() == [0.5, 0.0, 1.0, 0.0, 0.5, 0.75, 0.0, 1.5]


def test_trial_parameters_become_an_artifact() -> None:
    identity = ModelIdentity("tiny", HIDDEN, LAYERS, "f" * 64)
    refusal = torch.tensor([1.0, -1.0, 2.0, 0.5])
    harmful = Activations(activations(4, 1.0, 0), refusal)
    harmless = Activations(activations(4, 0, 1), -refusal)
    builder = ArtifactBuilder(harmful, harmless, identity, {"set": {"count": 4}})
    space = SearchSpace(LAYERS, max_rank=2)
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    for _ in range(12):
        trial = study.ask()
        candidate = space.suggest(trial)
        artifact = builder.build(candidate)
        assert artifact.directions.shape == (2 * LAYERS + 1, HIDDEN)
        assert artifact.method["estimator"] in {e.value for e in Estimator}
        last = LAYERS - 1
        index = candidate.shape.direction_index
        assert index is None or 0.4 * last + 1 <= index <= 0.9 * last + 1
        assert float(artifact.weights.min()) >= 0 and float(artifact.weights.max()) <= 1.5
        # The same parameters rebuild the same artifact (how the Pareto points are written).
        again = builder.build(space.suggest(optuna.trial.FixedTrial(trial.params)))
        assert torch.equal(again.directions, artifact.directions)
        assert torch.equal(again.weights, artifact.weights)
        study.tell(trial, [0.0, 0.0])
