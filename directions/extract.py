"""Step 1-2 of the pipeline (README.md): residual-stream activations at the last prompt token
for harmful and harmless instructions, and their per-layer difference of means.

Residual index ``i`` (0 <= i <= L) is the stream entering decoder layer ``i``; index ``L`` is the
stream after the last layer (before the final norm). Activations are kept per prompt (float32,
[prompts, L + 1, hidden], a few MB) so that the prompt sets can be filtered afterwards to those
the model actually refuses / answers; means are taken in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from abliserve.architectures import residual_layers
from abliserve.datasets import instructions_hash
from abliserve.directions.errors import DirectionError
from abliserve.directions.modelio import chat_batches, first_token_logprobs, refusal_scores
from abliserve.projection import normalise, project_out


@dataclass
class Activations:
    """Last-token residual streams of one prompt set and the baseline refusal score of each."""

    residuals: torch.Tensor  # [prompts, L + 1, hidden] float32
    refusal: torch.Tensor  # [prompts] first-token refusal log-odds without ablation


def collect(
    model: nn.Module,
    tokenizer,
    instructions: Sequence[str],
    refusal_ids: Sequence[int],
    batch_size: int,
    description: str,
) -> Activations:
    """Run the model over ``instructions`` and record the stream at the last prompt token."""
    layers = residual_layers(model)
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> None:
        captured.append(hidden[:, -1].detach().float())

    def capture_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        capture(args[0] if args else kwargs["hidden_states"])

    def capture_output(module: nn.Module, args: tuple, output: object) -> None:
        capture(output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_pre_hook(capture_input, with_kwargs=True) for m in layers]
    handles.append(layers[-1].register_forward_hook(capture_output))
    residuals, scores = [], []
    try:
        total = (len(instructions) + batch_size - 1) // batch_size
        for batch in tqdm(
            chat_batches(tokenizer, instructions, batch_size),
            total=total,
            desc=description,
            unit="batch",
        ):
            captured.clear()
            logprobs = first_token_logprobs(model, batch)
            residuals.append(torch.stack(captured, dim=1))
            scores.append(refusal_scores(logprobs, refusal_ids))
    finally:
        for handle in handles:
            handle.remove()
    return Activations(torch.cat(residuals), torch.cat(scores))


def cached_activations(
    load_model: Callable[[], nn.Module],
    tokenizer,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    batch_size: int,
    cache: Path | None,
) -> tuple[Activations, Activations]:
    """Extraction activations of both prompt sets, reused from ``cache`` when it holds the same
    prompts and refusal tokens (the model is then never loaded: ``load_model`` is only called
    on a miss), else collected and stored there."""
    key = {
        "harmful_train": instructions_hash(harmful),
        "harmless_train": instructions_hash(harmless),
        "refusal_ids": list(refusal_ids),
    }
    if cache is not None and cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored.get("key") == key:
            return Activations(*stored["harmful"]), Activations(*stored["harmless"])
    model = load_model()
    collected = [
        collect(model, tokenizer, texts, refusal_ids, batch_size, f"{name} prompts")
        for name, texts in (("harmful", harmful), ("harmless", harmless))
    ]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "key": key,
                "harmful": (collected[0].residuals, collected[0].refusal),
                "harmless": (collected[1].residuals, collected[1].refusal),
            },
            cache,
        )
    return collected[0], collected[1]


@dataclass
class MeanDifference:
    """Per-residual-index statistics the candidate directions are built from."""

    difference: torch.Tensor  # [L + 1, hidden] float64, harmful mean - harmless mean
    harmless_mean: torch.Tensor  # [L + 1, hidden] float64
    harmful_count: int
    harmless_count: int

    def directions(self, projected: bool) -> torch.Tensor:
        """Unit candidate directions [L + 1, hidden] float32 (optionally projected, MATHS.md)."""
        difference = self.difference
        if projected:
            difference = project_out(difference, self.harmless_mean)
        return normalise(difference).float()


def behaviour_rows(
    harmful: Activations, harmless: Activations, filter_by_behaviour: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual rows [prompts, L + 1, hidden] a direction is estimated from; with
    ``filter_by_behaviour`` only prompts the model refuses (harmful, refusal log-odds > 0) or
    answers (harmless, < 0) count, so the direction is not diluted by prompts on which the model
    shows no refusal behaviour at all."""
    if not filter_by_behaviour:
        return harmful.residuals, harmless.residuals
    harmful_rows = harmful.residuals[harmful.refusal > 0]
    harmless_rows = harmless.residuals[harmless.refusal < 0]
    if len(harmful_rows) == 0 or len(harmless_rows) == 0:
        raise DirectionError(
            "filtering left no prompts: the model refuses none of the harmful prompts or "
            "all of the harmless ones; run without --filter-prompts"
        )
    return harmful_rows, harmless_rows


def mean_difference(
    harmful: Activations, harmless: Activations, filter_by_behaviour: bool
) -> MeanDifference:
    """Difference of means over :func:`behaviour_rows`."""
    harmful_rows, harmless_rows = behaviour_rows(harmful, harmless, filter_by_behaviour)
    harmless_mean = harmless_rows.double().mean(0)
    return MeanDifference(
        difference=harmful_rows.double().mean(0) - harmless_mean,
        harmless_mean=harmless_mean,
        harmful_count=len(harmful_rows),
        harmless_count=len(harmless_rows),
    )
