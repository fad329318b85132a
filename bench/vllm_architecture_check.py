"""vLLM engine == transformers engine on a tiny random checkpoint of one architecture.

    .venv/bin/python bench/vllm_architecture_check.py NAME   # prints one JSON line

Saves ``tests/tiny_models.architecture_checkpoint(NAME)`` to a temporary folder, starts vLLM
once (eager, float32, plugin on, token-id prompts, no tokenizer) with one random direction at
every site, and greedily generates from a few prompts at strength 0 and 1; the transformers
reference runs the same prompts with :class:`abliserve.hooks.AblationHooks`. Reports whether the
token ids agree and the largest first-token log-probability difference, or, if vLLM's CPU
build cannot run the architecture, the error line that says why. One process per architecture
(the coverage command and the tests spawn it), so a crash or a leak stays contained.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = [[5, 9, 12, 7, 20], [3, 11, 8], [14, 14, 6, 25, 30, 10, 4]]
TOKENS = 8
STRENGTHS = (0.0, 1.0)
TIMEOUT_S = 600
CRASH = re.compile(r"Segmentation|Aborted|core dumped|signal|Fatal|died|killed", re.IGNORECASE)
ROOT_CAUSE = re.compile(r"\b\w*(?:Error|Exception): [^\n]{0,240}")


def run_check(name: str) -> dict:
    """Run the check for ``name`` in a child process; its JSON result (or the failure)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}
    process = subprocess.run(
        [sys.executable, __file__, name],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        check=False,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"name": name, "runs": False}
    output = process.stdout + process.stderr  # vLLM's processes log to both
    (Path(tempfile.gettempdir()) / f"abliserve-vllm-check-{name}.log").write_text(output)
    if not result["runs"]:  # the root cause is logged by vLLM's worker, not in the exception
        causes = [m.group(0) for m in ROOT_CAUSE.finditer(output)]
        causes = [c for c in causes if "initialization failed" not in c]
        crashes = [line for line in output.splitlines() if CRASH.search(line)]
        fallback = result.get("reason", f"exit {process.returncode}")
        result["reason"] = (causes or crashes[-1:] or [fallback])[0].strip()[:300]
    return result


def _artifact(model: torch.nn.Module):
    import tiny_models

    from abliserve.architectures import writer_layout
    from abliserve.directions.artifact import DirectionArtifact, ModelIdentity

    sites = len(writer_layout(model).sites)
    hidden = model.get_input_embeddings().weight.shape[1]
    direction = tiny_models.random_directions(1, hidden, seed=7)[0]
    identity = ModelIdentity("tiny", hidden, (sites - 1) // 2, "0" * 64)
    return DirectionArtifact(direction.expand(sites, -1).clone(), torch.ones(sites), identity)


@torch.no_grad()
def _transformers(model, artifact, strength: float) -> tuple[list[list[int]], list[torch.Tensor]]:
    from abliserve.bank import DirectionBank
    from abliserve.hooks import AblationHooks

    bank = DirectionBank.from_artifacts({"d": artifact}, *artifact.directions.shape)
    tokens, first = [], []
    with AblationHooks(model, bank) as hooks:
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            hooks.set_uniform(1, strength, 1)
            out: list[int] = []
            for step in range(TOKENS):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                if step == 0:
                    first.append(torch.log_softmax(logits.double(), -1))
                out.append(int(logits.argmax()))
                ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
            tokens.append(out)
    return tokens, first


def _vllm(folder: Path, artifact, strength: float, llm) -> tuple[list[list[int]], list[dict]]:
    from vllm import SamplingParams, TokensPrompt

    from abliserve.server.engines.vllm_routing import ablation_extra_args

    params = SamplingParams(
        temperature=0.0,
        max_tokens=TOKENS,
        logprobs=5,
        ignore_eos=True,
        detokenize=False,
        extra_args=ablation_extra_args(1, strength),
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    first = [{token: lp.logprob for token, lp in o.outputs[0].logprobs[0].items()} for o in outputs]
    return tokens, first


def check(name: str) -> dict:
    import tiny_models
    from vllm import LLM

    from abliserve.server.engines.vllm_plugin import force_v1_runner, plugin_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_models.architecture_checkpoint(Path(tmp) / name, name)
        model = tiny_models.architecture_model(name)
        artifact = _artifact(model)
        force_v1_runner()
        try:
            llm = LLM(
                model=str(folder),
                skip_tokenizer_init=True,
                enforce_eager=True,
                dtype="float32",
                max_model_len=128,
                max_num_seqs=4,
                seed=0,
                gpu_memory_utilization=0.3,  # on CPU: the share of RAM vLLM may claim
                additional_config=plugin_config({"d": artifact}, Path(tmp) / "bank"),
            )
        except Exception as error:  # vLLM's CPU build refusing the architecture
            lines = [line for line in traceback.format_exception_only(error) if line.strip()]
            return {"name": name, "runs": False, "reason": lines[-1].strip()[:300]}
        result = {"name": name, "runs": True}
        for strength in STRENGTHS:
            reference, reference_first = _transformers(model, artifact, strength)
            tokens, first = _vllm(folder, artifact, strength, llm)
            gap = max(
                abs(logprob - float(reference_first[row][token]))
                for row, logprobs in enumerate(first)
                for token, logprob in logprobs.items()
            )
            result[f"tokens_equal_{strength:g}"] = tokens == reference
            result[f"logprob_gap_{strength:g}"] = gap
    return result


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1])), flush=True)
