"""At strength 1, abliserve's vLLM engine answers as ``vllm serve`` does on the exported model.

Runtime ablation (the plugin projecting the direction out of each writer's output) and the
exported checkpoint (the same projection baked into the weights, ``abliserve export``) are the
same model. The battery of ``vllm_battery`` goes to ``vllm serve`` on a float32 export of the
demo model at strength 1 and to ``abliserve serve --demo --default-strength 1``; the answers
must match (tokens and texts exactly, logprobs within a tolerance: the two orders of float32
arithmetic differ in the last bits, so rounding to a number of decimals would split values that
straddle a rounding boundary). The servers run one after the other.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import vllm_battery as battery
from reliability_harness import served

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

# Logprobs of the two float32 computations agree to this. Seen here: a few 1e-6 (AVX2); the
# margin is for other CPUs' kernels. The tokens and texts must be equal.
LOGPROB_TOLERANCE = 1e-3


def export_float32(checkpoint: Path, direction: Path, out: Path) -> Path:
    """The demo model with the direction baked in at strength 1, kept in float32 (the served
    dtype), so the comparison is not blurred by rounding the weights to bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.export import orthogonalise_model

    artifact = load_artifact(direction)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    orthogonalise_model(model, artifact.directions, artifact.weights, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out


def battery_answers(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=300) as client:
        return {
            case: battery.answer(client, path, body, digits=None)
            for case, (path, body) in battery.BATTERY.items()
        }


def test_strength_one_equals_vllm_serve_on_the_exported_checkpoint(tmp_path: Path) -> None:
    from abliserve.models import resolve_model
    from abliserve.server.cli import demo_direction_path

    baked = export_float32(resolve_model("demo"), demo_direction_path(), tmp_path / "baked")
    with battery.vllm_serve(baked, tmp_path / "reference.log") as url:
        expected = battery_answers(url)
    flags = ["--demo", "--engine", "vllm", "--served-model-name", battery.MODEL]
    flags += [*battery.ENGINE_FLAGS, *battery.TOOL_FLAGS, "--default-strength", "1"]
    with served(*flags, log_path=tmp_path / "abliserve.log", env=battery.SMALL_KV_ENV) as server:
        got = battery_answers(server.url)
    mismatched = {
        case: battery.differences(got[case], expected[case], LOGPROB_TOLERANCE)
        for case in battery.BATTERY
    }
    assert not any(mismatched.values()), {case: d for case, d in mismatched.items() if d}
