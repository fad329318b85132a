"""``abliserve directions optimize``: a multi-objective TPE search over direction estimators and
ablation shapes, every trial measured through one running engine (docs/OPTIMIZE.md).

Each round asks Optuna for ``batch`` trials, builds their artifacts from the cached extraction
activations, loads them into the engine at run time, measures all of them side by side
(:mod:`abliserve.optimize.objectives`), tells Optuna the scores and unloads them. The study lives
in a journal file, so a rerun with the same ``--study`` continues up to the requested number of
trials; trials a killed run left unfinished are measured again.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from tqdm import tqdm

from abliserve.datasets import PROMPT_SETS, default_path, instructions_hash, load_instructions
from abliserve.directions.errors import DirectionError
from abliserve.directions.estimators import Estimator
from abliserve.directions.extract import cached_activations
from abliserve.directions.identity import checkpoint_identity
from abliserve.directions.modelio import (
    DEFAULT_REFUSAL_WORDS,
    load_model,
    load_tokenizer,
    refusal_token_ids,
)
from abliserve.models import resolve_model
from abliserve.optimize.objectives import EngineObjectives
from abliserve.optimize.report import print_front, save_front_plot
from abliserve.optimize.space import ArtifactBuilder, SearchSpace
from abliserve.server.engines import EngineOptions, create_engine
from abliserve.server.engines.base import Engine

STUDY_NAME = "abliserve-optimize"
OBJECTIVES = ("refusal_rate", "kl")


@dataclass
class OptimizeOptions:
    model: str
    study: Path
    out: Path
    trials: int = 40
    batch: int = 4
    engine: str = "auto"
    seed: int = 0
    startup_trials: int = 10
    warm_start: tuple[Path, ...] = ()  # earlier optimize artifacts, measured first
    prompt_files: dict[str, str | None] = field(default_factory=dict)  # set name -> file
    train_count: int = 192
    kl_count: int = 64
    max_new_tokens: int = 32
    estimators: tuple[Estimator, ...] = tuple(Estimator)
    max_rank: int = 16
    dtype: str = "auto"
    max_num_seqs: int = 64
    batch_size: int = 16  # extraction batches
    activations_cache: Path | None = None


@dataclass(frozen=True)
class Prompts:
    """Extraction sets (the first ``train_count`` training prompts) and validation sets (the
    rest of ``harmful_train`` plus ``harmful_val``; the first ``kl_count`` of
    ``harmless_val``). JailbreakBench is not among them: it is the test set."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_validation: list[str]
    harmless_validation: list[str]

    @classmethod
    def load(cls, options: OptimizeOptions) -> Prompts:
        sets = {
            name: load_instructions(options.prompt_files.get(name) or default_path(name))
            for name in PROMPT_SETS
        }
        count = options.train_count
        return cls(
            harmful_train=sets["harmful_train"][:count],
            harmless_train=sets["harmless_train"][:count],
            harmful_validation=sets["harmful_train"][count:] + sets["harmful_val"],
            harmless_validation=sets["harmless_val"][: options.kl_count],
        )

    def datasets(self, options: OptimizeOptions) -> dict:
        """Provenance for every artifact's metadata."""
        source = {
            name: str(options.prompt_files.get(name) or f"package:{name}") for name in PROMPT_SETS
        }
        return {
            name: {"sources": sources, "count": len(texts), "sha256": instructions_hash(texts)}
            for name, texts, sources in (
                ("harmful_train", self.harmful_train, [source["harmful_train"]]),
                ("harmless_train", self.harmless_train, [source["harmless_train"]]),
                (
                    "harmful_validation",
                    self.harmful_validation,
                    [source["harmful_train"], source["harmful_val"]],
                ),
                ("harmless_validation", self.harmless_validation, [source["harmless_val"]]),
            )
        }


def open_study(options: OptimizeOptions) -> optuna.Study:
    """The study in ``options.study`` (created if new), with a seeded multi-objective TPE."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    options.study.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=JournalStorage(JournalFileBackend(str(options.study))),
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(
            seed=options.seed,
            n_startup_trials=options.startup_trials,
            multivariate=True,
            constant_liar=True,
        ),
        load_if_exists=True,
    )


def requeue_unfinished(study: optuna.Study) -> None:
    """Trials a killed run left running are failed and their parameters asked again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=True)


def enqueue_warm_start(
    study: optuna.Study, space: SearchSpace, artifacts: tuple[Path, ...], fingerprint: str
) -> None:
    """Queue the parameters of earlier ``optimize`` artifacts (their metadata keeps them), so a
    new study measures known-good points first and TPE searches around them. Checked before
    extraction: an artifact of another model, or one not written by ``optimize``, is an
    error, and so is a point outside this run's space (an estimator or rank it excludes). A
    point the study already holds is not queued again, so a resumed run with the same
    ``--warm-start`` measures nothing twice."""
    from abliserve.directions.artifact import load_artifact

    for path in artifacts:
        artifact = load_artifact(path)
        params = artifact.scores.get("params")
        if artifact.method.get("name") != "optimize" or not isinstance(params, dict):
            raise DirectionError(
                f"--warm-start {path}: not written by 'directions optimize' (its metadata has "
                "no trial parameters)"
            )
        if artifact.model.fingerprint != fingerprint:
            raise DirectionError(
                f"--warm-start {path}: made for another checkpoint (fingerprint "
                f"{artifact.model.fingerprint[:12]}…, this model {fingerprint[:12]}…)"
            )
        outside = space.outside(params)
        if outside:
            raise DirectionError(
                f"--warm-start {path}: outside this search space ({'; '.join(outside)})"
            )
        study.enqueue_trial(params, skip_if_exists=True)


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def optimize(options: OptimizeOptions) -> list[FrozenTrial]:
    """Run the search up to ``options.trials`` completed trials; returns the Pareto front."""
    checkpoint = resolve_model(options.model)
    identity = checkpoint_identity(checkpoint)
    prompts = Prompts.load(options)
    if not prompts.harmful_validation or not prompts.harmless_validation:
        raise DirectionError(
            "no validation prompts left: harmful_train beyond --train-count plus harmful_val, "
            "and harmless_val, must not be empty"
        )
    study = open_study(options)
    _check_same_run(study, options, prompts, identity.fingerprint)
    requeue_unfinished(study)
    enqueue_warm_start(
        study,
        SearchSpace(identity.num_layers, options.estimators, options.max_rank),
        options.warm_start,
        identity.fingerprint,
    )

    tokenizer = load_tokenizer(checkpoint)
    refusal_ids = refusal_token_ids(tokenizer, DEFAULT_REFUSAL_WORDS)
    harmful, harmless = cached_activations(
        lambda: load_model(checkpoint)[0],
        tokenizer,
        prompts.harmful_train,
        prompts.harmless_train,
        refusal_ids,
        options.batch_size,
        options.activations_cache or options.study.with_suffix(".activations.pt"),
    )
    builder = ArtifactBuilder(harmful, harmless, identity, prompts.datasets(options))
    space = SearchSpace(
        identity.num_layers, options.estimators, options.max_rank, builder.can_filter()
    )
    if len(completed(study)) < options.trials:
        engine = create_engine(
            options.engine,
            checkpoint,
            identity,
            {},
            EngineOptions(
                dtype=options.dtype,
                max_num_seqs=options.max_num_seqs,
                max_directions=options.batch,
            ),
        )
        objectives = EngineObjectives(
            engine,
            tokenizer,
            prompts.harmful_validation,
            prompts.harmless_validation,
            options.max_new_tokens,
        )
        asyncio.run(_search(study, space, builder, engine, objectives, options))
    front = study.best_trials
    _write_front(study, front, space, builder, options)
    return front


async def _search(
    study: optuna.Study,
    space: SearchSpace,
    builder: ArtifactBuilder,
    engine: Engine,
    objectives: EngineObjectives,
    options: OptimizeOptions,
) -> None:
    await engine.start()
    try:
        started = time.monotonic()
        baseline = await objectives.baseline()
        study.set_user_attr("baseline", baseline.summary())
        searching = time.monotonic()
        done = measured = len(completed(study))
        with tqdm(total=options.trials, initial=done, desc="trials", unit="trial") as bar:
            while done < options.trials:
                size = min(options.batch, options.trials - done)
                await _round(study, space, builder, engine, objectives, size)
                done += size
                bar.update(size)
                bar.set_postfix_str(_best_text(study))
        measured = done - measured
        timing = {
            "engine": engine.name,
            "batch": options.batch,
            "baseline_seconds": searching - started,
            "trials": measured,
            "trial_seconds": time.monotonic() - searching,
        }
        study.set_user_attr("last_run", timing)
        print(
            f"{measured} trials in {timing['trial_seconds'] / 60:.1f} min "
            f"({3600 * measured / timing['trial_seconds']:.1f} trials/hour; baseline "
            f"{timing['baseline_seconds']:.0f} s, engine {engine.name}, --batch {options.batch})",
            file=sys.stderr,
        )
    finally:
        await engine.shutdown()


async def _round(
    study: optuna.Study,
    space: SearchSpace,
    builder: ArtifactBuilder,
    engine: Engine,
    objectives: EngineObjectives,
    size: int,
) -> None:
    """Ask ``size`` trials, load their artifacts, measure them side by side, tell, unload."""
    trials = [study.ask() for _ in range(size)]
    candidates = {f"trial-{t.number}": (t, space.suggest(t)) for t in trials}
    for name, (_, candidate) in candidates.items():
        await engine.add_direction(name, builder.build(candidate))
    try:
        scores = await objectives.score(list(candidates))
    finally:
        for name in candidates:
            await engine.remove_direction(name)
    for (trial, _), score in zip(candidates.values(), scores, strict=True):
        trial.set_user_attr("scores", score.summary())
        study.tell(trial, [score.refusal_rate, score.kl])


def _best_text(study: optuna.Study) -> str:
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    return " ".join(f"{t.values[0]:.0%}@{t.values[1]:.3f}" for t in front[:4])


def _write_front(
    study: optuna.Study,
    front: list[FrozenTrial],
    space: SearchSpace,
    builder: ArtifactBuilder,
    options: OptimizeOptions,
) -> None:
    """One artifact per Pareto point (parameters and validation scores in its metadata), a
    JSON summary, the table and the plot."""
    options.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for trial in sorted(front, key=lambda t: t.values[0]):
        candidate = space.suggest(FixedTrial(trial.params))
        scores = trial.user_attrs["scores"]
        artifact = builder.build(
            candidate, scores={"validation": scores, "trial": trial.number, "params": trial.params}
        )
        path = artifact.save(options.out / f"trial-{trial.number:04d}.safetensors")
        rows.append(
            {"trial": trial.number, "artifact": str(path), **scores, "params": trial.params}
        )
    baseline = study.user_attrs.get("baseline")
    summary = {"baseline": baseline, "trials": len(completed(study)), "front": rows}
    (options.out / "pareto.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_front(rows, baseline)
    plot = save_front_plot(completed(study), front, baseline, options.out / "pareto.png")
    print(
        f"wrote {len(rows)} artifacts, pareto.json and {plot.name} to {options.out}",
        file=sys.stderr,
    )


def _check_same_run(
    study: optuna.Study, options: OptimizeOptions, prompts: Prompts, fingerprint: str
) -> None:
    """A study's scores are comparable only on the same model, prompts and token budget."""
    identity = {
        "fingerprint": fingerprint,
        "max_new_tokens": options.max_new_tokens,
        "estimators": [e.value for e in options.estimators],
        "max_rank": options.max_rank,
        "datasets": {k: v["sha256"] for k, v in prompts.datasets(options).items()},
    }
    previous = study.user_attrs.get("run")
    if previous is None:
        study.set_user_attr("run", identity)
    elif previous != identity:
        changed = sorted(k for k in identity if identity[k] != previous.get(k))
        raise DirectionError(
            f"--study {options.study} holds trials of a different run ({', '.join(changed)} "
            "differ); use another --study"
        )
