"""``abliserve directions compute``: extraction, selection, report and artifact in one run.

Every input is validated before the model is loaded, and every output is written atomically,
so a bad option costs a second and a crash never leaves a half-written artifact behind.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from abliserve.architectures import WriterSpec
from abliserve.datasets import PROMPT_SETS, default_path, instructions_hash, load_instructions
from abliserve.directions.artifact import DirectionArtifact
from abliserve.directions.errors import DirectionError
from abliserve.directions.extract import cached_activations, mean_difference
from abliserve.directions.identity import checkpoint_identity
from abliserve.directions.modelio import DEFAULT_REFUSAL_WORDS, load_model, refusal_token_ids
from abliserve.directions.report import print_table, save_plot
from abliserve.directions.select import (
    Scorer,
    SiteProfile,
    choose,
    score_candidates,
    site_tensors,
)
from abliserve.models import read_config, resolve_model


@dataclass
class ComputeOptions:
    model: str
    out: Path
    report: Path | None = None
    prompt_files: dict[str, str | None] = field(default_factory=dict)  # set name -> file
    train_count: int = 128
    val_count: int = 32
    layer: int | None = None
    candidate_layers: list[int] | None = None
    skip_last_fraction: float = 0.2
    kl_bound: float = 0.1
    projected: bool = False
    filter_prompts: bool = False
    profile: SiteProfile = field(default_factory=SiteProfile)
    refusal_words: tuple[str, ...] = DEFAULT_REFUSAL_WORDS
    batch_size: int = 16
    activations_cache: Path | None = None
    writers: WriterSpec | None = None  # --writers, for architectures the rule does not know


def candidate_layers(options: ComputeOptions, num_layers: int) -> list[int]:
    """The layers to score: explicit, else just ``--layer``, else all but the last ~20%."""
    if options.layer is not None and not 0 <= options.layer < num_layers:
        raise DirectionError(
            f"--layer {options.layer} is out of range: the model has layers 0..{num_layers - 1}"
        )
    if options.candidate_layers:
        layers = sorted(set(options.candidate_layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise DirectionError(
                f"--candidate-layers {bad} out of range: the model has layers 0..{num_layers - 1}"
            )
        if options.layer is not None and options.layer not in layers:
            layers = sorted({*layers, options.layer})
        return layers
    if options.layer is not None:
        return [options.layer]
    # Layer 0 reads the embedding of the last template token, the same for every prompt: its
    # difference of means is zero, so it is never a candidate by default.
    return list(range(1, max(2, round(num_layers * (1 - options.skip_last_fraction)))))


def load_prompt_sets(options: ComputeOptions) -> dict[str, list[str]]:
    sets = {}
    for name in PROMPT_SETS:
        path = options.prompt_files.get(name) or default_path(name)
        count = options.train_count if name.endswith("train") else options.val_count
        sets[name] = load_instructions(path)[:count]
    return sets


def compute(options: ComputeOptions) -> DirectionArtifact:
    checkpoint = resolve_model(options.model)
    num_layers = int(read_config(checkpoint)["num_hidden_layers"])
    layers = candidate_layers(options, num_layers)
    if options.profile.first_layer >= num_layers:
        raise DirectionError(
            f"--first-layer {options.profile.first_layer} leaves no writer: "
            f"the model has layers 0..{num_layers - 1}"
        )
    prompts = load_prompt_sets(options)
    identity = checkpoint_identity(checkpoint)

    model, tokenizer = load_model(checkpoint, writers=options.writers)
    refusal_ids = refusal_token_ids(tokenizer, options.refusal_words)
    harmful, harmless = cached_activations(
        lambda: model,
        tokenizer,
        prompts["harmful_train"],
        prompts["harmless_train"],
        refusal_ids,
        options.batch_size,
        options.activations_cache,
    )
    statistics = mean_difference(harmful, harmless, options.filter_prompts)
    candidates = statistics.directions(options.projected)
    empty = [layer for layer in layers if not bool(candidates[layer].any())]
    if empty:
        raise DirectionError(
            f"the difference of means is zero at layer(s) {empty} (the last "
            "prompt token's stream does not depend on the prompt there); "
            "choose later layers"
        )

    scorer = Scorer(
        model,
        tokenizer,
        prompts["harmful_val"],
        prompts["harmless_val"],
        refusal_ids,
        options.batch_size,
        options.writers,
    )
    scores = score_candidates(scorer, candidates, statistics.difference, layers, options.profile)
    best, any_passed = choose(scores, options.kl_bound)
    chosen = (
        next(s for s in scores if s.layer == options.layer) if options.layer is not None else best
    )
    if options.layer is None and not any_passed:
        print(
            f"abliserve: warning: no candidate has KL <= {options.kl_bound} and a positive "
            f"induce score; chose layer {chosen.layer} by refusal score alone",
            file=sys.stderr,
        )

    print_table(scores, chosen.layer, options.kl_bound, scorer.harmful_baseline_refusal)
    report = options.report or options.out.with_suffix(".layers.png")
    save_plot(
        scores,
        chosen.layer,
        options.kl_bound,
        report,
        f"{identity.model_id}: candidate layers ({'projected ' if options.projected else ''}"
        f"diff of means)",
    )

    directions, weights = site_tensors(candidates, chosen.layer, options.profile)
    artifact = DirectionArtifact(
        directions=directions,
        weights=weights,
        model=identity,
        method={
            "name": "diff-of-means",
            "layer": chosen.layer,
            "selection": "manual (--layer)" if options.layer is not None else "automatic",
            "position": "last prompt token",
            "projected": options.projected,
            "filter_prompts": options.filter_prompts,
            "profile": options.profile.describe(),
            "refusal_tokens": list(options.refusal_words),
            "kl_bound": options.kl_bound,
            "candidate_layers": layers,
        },
        datasets={
            name: {
                "source": str(options.prompt_files.get(name) or f"package:{name}"),
                "count": len(texts),
                "sha256": instructions_hash(texts),
            }
            for name, texts in prompts.items()
        }
        | {
            "used_for_mean": {
                "harmful": statistics.harmful_count,
                "harmless": statistics.harmless_count,
            }
        },
        scores={
            "baseline_harmful_refusal": scorer.harmful_baseline_refusal,
            "chosen": asdict(chosen),
            "candidates": [asdict(s) for s in scores],
            "passed_filters": chosen.passes(options.kl_bound),
        },
    )
    artifact.save(options.out)
    print(f"wrote {options.out} (layer {chosen.layer}) and {report}", file=sys.stderr)
    return artifact
