"""Prove that an artifact from bench/heretic/translate.py is heretic's edit: same logits.

Two halves, each in its own environment (heretic's pins differ from abliserve's):

    cd RUN && bench/heretic/.venv/bin/python prove_translation.py heretic TRIAL OUT.safetensors
        heretic's own Model (config.toml of RUN), abliterated by heretic's ``abliterate`` with
        the trial's parameters and RUN/refusal_directions.safetensors; writes each prompt's
        token ids, all-position logits and a greedy continuation
    .venv/bin/python prove_translation.py abliserve OUT.safetensors ARTIFACT CHECKPOINT
        the plain checkpoint with abliserve's ablation hooks at strength 1 and the translated
        artifact, on the same token ids; prints the max |logit difference| and whether the
        greedy continuations are equal

The prompts are the first few validation prompts of both kinds, one sequence per forward (no
padding), float32.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file

PROMPTS_PER_KIND = 3
NEW_TOKENS = 24


def heretic_half(trial_index: str, out: str) -> None:
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts

    torch.set_grad_enabled(False)
    sys.argv = sys.argv[:1]
    settings = Settings()
    with open("front.json") as file:
        front = json.load(file)
    trial = next(t for t in front["trials"] if t["index"] == int(trial_index))
    model = Model(settings)
    directions = load_file("refusal_directions.safetensors")["refusal_directions"]
    parameters = {name: AbliterationParameters(**p) for name, p in trial["parameters"].items()}
    model.abliterate(directions, trial["direction_index"], parameters)
    prompts = (
        load_prompts(settings, settings.bad_evaluation_prompts)[:PROMPTS_PER_KIND]
        + load_prompts(settings, settings.good_evaluation_prompts)[:PROMPTS_PER_KIND]
    )
    tensors = {}
    for number, prompt in enumerate(prompts):
        inputs, outputs = model.generate([prompt], max_new_tokens=NEW_TOKENS)
        ids = inputs["input_ids"]
        tensors[f"ids.{number}"] = ids[0]
        tensors[f"logits.{number}"] = model.model(input_ids=ids).logits[0].float()
        tensors[f"greedy.{number}"] = outputs[0, ids.shape[1] :]
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    print(f"heretic trial {trial_index}: {len(prompts)} prompts -> {out}")


def abliserve_half(heretic_out: str, artifact_path: str, checkpoint: str) -> None:
    from transformers import AutoModelForCausalLM

    from abliserve.bank import DirectionBank
    from abliserve.directions.artifact import load_artifact
    from abliserve.hooks import AblationHooks

    reference = load_file(heretic_out)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    artifact = load_artifact(artifact_path)
    bank = DirectionBank.from_artifacts({"heretic": artifact}, *artifact.directions.shape)
    worst, equal, count = 0.0, 0, len([k for k in reference if k.startswith("ids.")])
    with AblationHooks(model, bank) as hooks, torch.no_grad():
        hooks.set_uniform(1, 1.0, 1)
        for number in range(count):
            ids = reference[f"ids.{number}"].unsqueeze(0)
            logits = model(input_ids=ids).logits[0].float()
            worst = max(worst, float((logits - reference[f"logits.{number}"]).abs().max()))
            greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, ids.shape[1] :
            ]
            equal += int(torch.equal(greedy, reference[f"greedy.{number}"]))
            scale = float(reference[f"logits.{number}"].abs().max())
    print(
        f"max |logit difference| {worst:.3g} (logit scale {scale:.1f}); "
        f"greedy {NEW_TOKENS}-token continuations equal on {equal}/{count} prompts"
    )


if __name__ == "__main__":
    {"heretic": heretic_half, "abliserve": abliserve_half}[sys.argv[1]](*sys.argv[2:])
