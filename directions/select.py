"""Step 3 of the pipeline (README.md): turn candidate directions into per-site tensors and
pick the candidate layer automatically.

Each candidate layer ``l`` is scored as the artifact it would become:
- ``refusal``: mean first-token refusal log-odds on harmful validation prompts, with ablation
  (lower is better: the model no longer opens with "I"/"As"),
- ``kl``: mean first-token KL(baseline || ablated) on harmless validation prompts (damage;
  candidates above a bound are rejected),
- ``induce``: mean refusal log-odds on harmless prompts with the unnormalised mean difference
  *added* at layer ``l``'s input (a real refusal direction makes the model refuse: must be > 0).
The lowest refusal score among the candidates that pass both filters wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from abliserve.architectures import WriterSpec, residual_layers
from abliserve.bank import DirectionBank
from abliserve.directions.modelio import (
    chat_batches,
    first_token_logprobs,
    kl_divergence,
    refusal_scores,
)
from abliserve.hooks import AblationHooks
from abliserve.projection import site_names


@dataclass(frozen=True)
class SiteProfile:
    """Which direction each writer uses and how strongly (docs/MATHS.md, per-layer directions).

    A writer of decoder layer ``j`` writes into residual index ``j + 1`` (the embedding into 0).
    ``per_layer``: each writer uses the direction of the residual it writes into (heretic-style)
    instead of the one candidate direction everywhere. ``width``: weights follow a linear kernel
    peaked (weight 1) at the writers into the candidate's residual index, falling to
    ``min_weight`` at ``width`` layers away and to 0 beyond; None = weight 1 everywhere.
    ``first_layer``: writers of earlier decoder layers, and the embedding if > 0, are left alone.
    """

    per_layer: bool = False
    width: float | None = None
    min_weight: float = 0.0
    first_layer: int = 0

    def describe(self) -> dict:
        return asdict(self)


def site_tensors(
    candidates: torch.Tensor, layer: int, profile: SiteProfile
) -> tuple[torch.Tensor, torch.Tensor]:
    """Artifact tensors for candidate ``layer``: directions [S, hidden] and weights [S].

    candidates: [L + 1, hidden] unit directions, one per residual index.
    """
    num_layers = candidates.shape[0] - 1
    directions, weights = [], []
    for site in range(len(site_names(num_layers))):
        writer_layer = -1 if site == 0 else (site - 1) // 2  # -1 = embedding
        target = writer_layer + 1  # the residual index this writer writes into
        directions.append(candidates[target] if profile.per_layer else candidates[layer])
        weight = 1.0
        if profile.width is not None:
            distance = abs(target - layer)
            weight = (
                1.0 - (1.0 - profile.min_weight) * distance / profile.width
                if distance <= profile.width
                else 0.0
            )
        if profile.first_layer > 0 and writer_layer < profile.first_layer:
            weight = 0.0
        weights.append(weight)
    return torch.stack(directions), torch.tensor(weights, dtype=torch.float32)


@dataclass
class CandidateScore:
    layer: int
    refusal: float
    kl: float
    induce: float

    def passes(self, kl_bound: float) -> bool:
        return self.kl <= kl_bound and self.induce > 0


class Scorer:
    """Scores candidates on fixed validation prompts; baseline outputs are computed once."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_ids: Sequence[int],
        batch_size: int,
        writers: WriterSpec | None = None,
    ) -> None:
        self.model, self.writers = model, writers
        self.refusal_ids = list(refusal_ids)
        self.harmful = list(chat_batches(tokenizer, harmful, batch_size))
        self.harmless = list(chat_batches(tokenizer, harmless, batch_size))
        self.harmless_baseline = [first_token_logprobs(model, b) for b in self.harmless]
        self.harmful_baseline_refusal = self._mean_refusal(self.harmful)

    def _mean_refusal(self, batches: list[dict[str, torch.Tensor]]) -> float:
        scores = [
            refusal_scores(first_token_logprobs(self.model, b), self.refusal_ids) for b in batches
        ]
        return float(torch.cat(scores).mean())

    def ablated(self, directions: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
        """(refusal on harmful, KL on harmless) with the artifact tensors applied at alpha 1."""
        bank = DirectionBank(
            names=["candidate"],
            directions=torch.stack([torch.zeros_like(directions), directions]),
            weights=torch.stack([torch.zeros_like(weights), weights]),
        )
        with AblationHooks(self.model, bank, self.writers) as hooks:
            refusal = []
            for batch in self.harmful:
                hooks.set_uniform(1, 1.0, len(batch["input_ids"]))
                logprobs = first_token_logprobs(self.model, batch)
                refusal.append(refusal_scores(logprobs, self.refusal_ids))
            kl = []
            for batch, baseline in zip(self.harmless, self.harmless_baseline, strict=True):
                hooks.set_uniform(1, 1.0, len(batch["input_ids"]))
                kl.append(kl_divergence(baseline, first_token_logprobs(self.model, batch)))
        return float(torch.cat(refusal).mean()), float(torch.cat(kl).mean())

    def induced(self, vector: torch.Tensor, layer: int) -> float:
        """Refusal on harmless prompts with ``vector`` added to the stream entering ``layer``."""
        module = residual_layers(self.model)[layer]

        def add(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                return (args[0] + vector.to(args[0].dtype), *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] + vector.to(
                kwargs["hidden_states"].dtype
            )
            return args, kwargs

        handle = module.register_forward_pre_hook(add, with_kwargs=True)
        try:
            return self._mean_refusal(self.harmless)
        finally:
            handle.remove()


def score_candidates(
    scorer: Scorer,
    candidates: torch.Tensor,
    differences: torch.Tensor,
    layers: Sequence[int],
    profile: SiteProfile,
) -> list[CandidateScore]:
    """Score every candidate layer (ablation at alpha 1 with its site tensors, and induction)."""
    scores = []
    for layer in tqdm(layers, desc="scoring candidate layers", unit="layer"):
        refusal, kl = scorer.ablated(*site_tensors(candidates, layer, profile))
        induce = scorer.induced(differences[layer].float(), layer)
        scores.append(CandidateScore(layer=layer, refusal=refusal, kl=kl, induce=induce))
    return scores


def choose(scores: Sequence[CandidateScore], kl_bound: float) -> tuple[CandidateScore, bool]:
    """The lowest refusal score among candidates passing the filters, and whether any passed.

    When none passes, the lowest refusal score overall is returned (and the caller warns)."""
    passing = [s for s in scores if s.passes(kl_bound)]
    pool = passing or list(scores)
    return min(pool, key=lambda s: s.refusal), bool(passing)
