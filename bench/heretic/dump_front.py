"""Read a finished heretic run (bench/heretic/run_heretic.sh) and write what abliserve needs.

Runs in heretic's own environment (bench/heretic/.venv), from the run's folder, so heretic's
Settings read the same config.toml the run used:

    cd WORK && .../bench/heretic/.venv/bin/python .../dump_front.py [front|directions]

(the directions need no finished trial, so they can be written while heretic still runs).

Writes into WORK:
  front.json                      heretic's Pareto front, selected exactly as heretic's menu
                                  selects it (sort by refusals then KL, keep strictly falling KL),
                                  with each trial's parameters and all completed trials' metrics
  refusal_directions.safetensors  heretic's per-layer refusal directions [layers + 1, hidden],
                                  recomputed with heretic's own code and settings (same prompts,
                                  batches and maths as its run), since heretic keeps them only in
                                  memory
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib.metadata import version

import optuna
import torch
import torch.nn.functional as F
from heretic.config import Settings
from heretic.model import Model
from heretic.utils import load_prompts
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import save_file


def load_settings() -> Settings:
    sys.argv = sys.argv[:1]  # heretic's Settings also parse the command line
    return Settings()  # ty: model comes from config.toml


def completed_trials(settings: Settings) -> list[FrozenTrial]:
    path = f"{settings.study_checkpoint_dir}/" + "".join(
        c if (c.isalnum() or c in ["_", "-"]) else "--" for c in settings.model
    )
    storage = JournalStorage(
        JournalFileBackend(path + ".jsonl", lock_obj=JournalFileOpenLock(path + ".jsonl"))
    )
    study = optuna.load_study(study_name="heretic", storage=storage)
    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """heretic's own front selection (its main.py), so the points are the ones it offers."""
    front, min_divergence = [], math.inf
    for trial in sorted(
        trials, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])
    ):
        if trial.user_attrs["kl_divergence"] < min_divergence:
            min_divergence = trial.user_attrs["kl_divergence"]
            front.append(trial)
    return front


def refusal_directions(settings: Settings) -> torch.Tensor:
    """heretic's per-layer directions, by its own code path (main.py, no residual plots)."""
    torch.set_grad_enabled(False)
    model = Model(settings)
    good_means = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad_means = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad_means - good_means, p=2, dim=1)
    if settings.orthogonalize_direction:
        good_directions = F.normalize(good_means, p=2, dim=1)
        projection = torch.sum(directions * good_directions, dim=1)
        directions = F.normalize(directions - projection.unsqueeze(1) * good_directions, p=2, dim=1)
    return directions


def trial_record(trial: FrozenTrial) -> dict:
    attrs = trial.user_attrs
    return {
        "index": attrs["index"],
        "refusals": attrs["refusals"],
        "n_bad_prompts": attrs["n_bad_prompts"],
        "base_refusals": attrs["base_refusals"],
        "kl_divergence": attrs["kl_divergence"],
        "direction_index": attrs["direction_index"],
        "parameters": attrs["parameters"],
        "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds(),
    }


def write_front(settings: Settings) -> None:
    trials = completed_trials(settings)
    front = pareto_front(trials)
    record = {
        "version": version("heretic-llm"),
        "settings": json.loads(settings.model_dump_json()),
        "front": [trial_record(t) for t in front],
        "trials": [trial_record(t) for t in trials],
    }
    with open("front.json", "w") as file:
        json.dump(record, file, indent=1)
    print(f"{len(trials)} completed trials, {len(front)} on the front")


def write_directions(settings: Settings) -> None:
    started = time.perf_counter()
    directions = refusal_directions(settings)
    save_file({"refusal_directions": directions.contiguous()}, "refusal_directions.safetensors")
    print(f"refusal directions {tuple(directions.shape)} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else "all"
    settings = load_settings()
    if step in ("front", "all"):
        write_front(settings)
    if step in ("directions", "all"):
        write_directions(settings)
