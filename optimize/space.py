"""The search space of ``abliserve directions optimize`` and how a trial becomes an artifact.

A trial picks how the direction is estimated (estimator, harmless-subspace rank, prompt
filtering; :mod:`abliserve.directions.estimators`) and the ablation's shape (direction index or
per layer, a tent kernel each for attention and MLP writers, the embedding's weight;
:mod:`abliserve.directions.shape`). Heretic's ranges are kept, in this project's indexing,
except that the kernel peak may also sit in the middle third of the stack, where the
mean-difference search in directions/RESULTS.md found the best layers of the demo model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

import optuna
import torch

from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.directions.estimators import Estimator, candidate_directions
from abliserve.directions.extract import Activations, behaviour_rows
from abliserve.directions.shape import AblationShape, Kernel, site_tensors

WRITER_KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose; ``estimators`` and ``max_rank`` narrow it (``--estimators``,
    ``--max-rank``); ``can_filter`` is False when prompt filtering would leave a class empty
    (a model that refuses none of the harmful prompts)."""

    num_layers: int
    estimators: tuple[Estimator, ...] = tuple(Estimator)
    max_rank: int = 16
    can_filter: bool = True

    def suggest(self, trial: optuna.Trial) -> Candidate:
        last = self.num_layers - 1
        per_layer = trial.suggest_categorical("direction_scope", ["global", "per layer"])
        # Heretic's direction index is a layer's *output*, i.e. residual index + 1 here.
        index = trial.suggest_float("direction_index", 0.4 * last + 1, 0.9 * last + 1)
        kernels = {}
        for kind in WRITER_KINDS:
            peak = trial.suggest_float(f"{kind}.max_weight", 0.8, 1.5)
            kernels[kind] = Kernel(
                max_weight=peak,
                max_weight_position=trial.suggest_float(
                    f"{kind}.max_weight_position", 0.4 * last, 1.0 * last
                ),
                min_weight=peak * trial.suggest_float(f"{kind}.min_weight", 0.0, 1.0),
                min_weight_distance=trial.suggest_float(
                    f"{kind}.min_weight_distance", 1.0, max(1.0, 0.6 * last)
                ),
            )
        return Candidate(
            estimator=Estimator(
                trial.suggest_categorical("estimator", [e.value for e in self.estimators])
            ),
            harmless_rank=trial.suggest_int("harmless_rank", 0, self.max_rank),
            filter_prompts=trial.suggest_categorical(
                "filter_prompts", [True, False] if self.can_filter else [False]
            ),
            shape=AblationShape(
                direction_index=None if per_layer == "per layer" else index,
                attention=kernels["attention"],
                mlp=kernels["mlp"],
                embedding_weight=trial.suggest_float("embedding_weight", 0.0, 1.0),
            ),
        )

    def outside(self, params: dict) -> list[str]:
        """Why ``params`` (an earlier trial's) is not a point of this space: each missing,
        unknown or out-of-range parameter, empty when it is one."""
        probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        self.suggest(probe)
        problems = [f"{name} missing" for name in probe.distributions if name not in params]
        problems += [f"{name} unknown" for name in params if name not in probe.distributions]
        for name, distribution in probe.distributions.items():
            value = params.get(name)
            if name in params and not _contains(distribution, value):
                problems.append(f"{name}={value!r} not in {distribution}")
        return problems


def _contains(distribution: optuna.distributions.BaseDistribution, value: object) -> bool:
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Candidate:
    """One point of the space, ready to be built into an artifact."""

    estimator: Estimator
    harmless_rank: int
    filter_prompts: bool
    shape: AblationShape

    def describe(self) -> dict:
        return asdict(self) | {"estimator": self.estimator.value}


class ArtifactBuilder:
    """Builds artifacts from cached activations; the candidate directions of each (estimator,
    rank, filtering) are computed once and shared by every trial that uses them."""

    def __init__(
        self,
        harmful: Activations,
        harmless: Activations,
        identity: ModelIdentity,
        datasets: dict,
    ) -> None:
        self.harmful, self.harmless = harmful, harmless
        self.identity, self.datasets = identity, datasets
        self._candidates = cache(self._directions)

    def can_filter(self) -> bool:
        """Whether prompt filtering leaves both classes some prompts."""
        return bool((self.harmful.refusal > 0).any() and (self.harmless.refusal < 0).any())

    def _directions(self, estimator: Estimator, rank: int, filter_prompts: bool) -> torch.Tensor:
        harmful_rows, harmless_rows = behaviour_rows(self.harmful, self.harmless, filter_prompts)
        return candidate_directions(harmful_rows, harmless_rows, estimator, rank)

    def build(self, candidate: Candidate, scores: dict | None = None) -> DirectionArtifact:
        candidates = self._candidates(
            candidate.estimator, candidate.harmless_rank, candidate.filter_prompts
        )
        directions, weights = site_tensors(candidates, candidate.shape)
        return DirectionArtifact(
            directions=directions,
            weights=weights,
            model=self.identity,
            method={"name": "optimize", "position": "last prompt token", **candidate.describe()},
            datasets=self.datasets,
            scores=scores or {},
        )
