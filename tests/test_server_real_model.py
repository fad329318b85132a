"""The demo model over HTTP on the transformers engine (one server for the module):

* invariant 3: 16 concurrent greedy requests mixing strengths 0 / 0.5 / 1 and two different
  directions (some streamed) each return exactly the token ids they return alone;
* a JailbreakBench prompt the baseline refuses is answered at strength 1 and refused again at
  strength 0 in the very next request (no state leaks between requests).
"""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import openai
import pytest
import torch
from server_harness import running_server

from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.projection import normalise
from abliserve.refusal import is_refusal

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]
HARMLESS = ["What is the capital of France?", "Write a haiku about the sea."]


def jailbreakbench_goals(count: int) -> list[str]:
    with open(REPO / "bench/data/jbb_harmful.csv", newline="") as handle:
        return [row["Goal"] for row, _ in zip(csv.DictReader(handle), range(count), strict=False)]


def second_direction(demo_direction: Path, path: Path) -> Path:
    """A truly different direction for the same model: the demo direction tilted by a fixed
    random vector per site, with a weight profile that spares the first half of the layers."""
    demo = load_artifact(demo_direction)
    generator = torch.Generator().manual_seed(0)
    tilt = normalise(torch.randn(demo.directions.shape, generator=generator))
    sites = demo.num_sites
    weights = torch.linspace(0.0, 1.5, sites).clamp(min=0) * (torch.arange(sites) > sites // 2)
    return DirectionArtifact(
        directions=normalise(demo.directions + 0.5 * tilt),
        weights=weights,
        model=demo.model,
        method={"name": "test: tilted demo direction with a weight profile"},
    ).save(path)


@pytest.fixture(scope="module")
def server(demo_checkpoint, demo_direction, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("real-server")
    other = second_direction(demo_direction, folder / "tilted.safetensors")
    with running_server(
        "--model",
        str(demo_checkpoint),
        "--engine",
        "transformers",
        "--served-model-name",
        "demo",
        "--direction",
        f"refusal={demo_direction}",
        "--direction",
        f"tilted={other}",
        "--max-num-seqs",
        "16",
        log_path=folder / "server.log",
    ) as url:
        yield url


def mixed_requests() -> list[dict]:
    prompts = [*jailbreakbench_goals(2), *HARMLESS]
    asks = [{"strength": s, "direction": d} for s in (0.0, 0.5, 1.0) for d in ("refusal", "tilted")]
    return [
        {
            "model": "demo",
            "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
            "temperature": 0,
            "max_tokens": 6,
            "logprobs": True,
            "extra_body": {"return_token_ids": True, "ablation": asks[i % len(asks)]},
        }
        for i in range(16)
    ]


async def token_ids(api: openai.AsyncOpenAI, request: dict, stream: bool) -> list[int]:
    if not stream:
        return (await api.chat.completions.create(**request)).choices[0].token_ids
    ids: list[int] = []
    async for chunk in await api.chat.completions.create(**request, stream=True):
        if chunk.choices:
            ids += getattr(chunk.choices[0], "token_ids", None) or []
    return ids


def test_concurrent_mixed_requests_equal_solo(server):
    requests = mixed_requests()

    async def scenario():
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)
        solo = [await api.chat.completions.create(**r) for r in requests]
        together = await asyncio.gather(
            *(token_ids(api, r, stream=i % 4 == 0) for i, r in enumerate(requests))
        )
        return solo, together

    solo, together = asyncio.run(scenario())
    solo_ids = [reply.choices[0].token_ids for reply in solo]
    assert all(len(ids) > 0 for ids in solo_ids)
    assert together == solo_ids
    # The mix really is mixed: the strengths and directions change the model's distribution
    # (more distinct first-token log-probabilities than there are prompts).
    first = {round(reply.choices[0].logprobs.content[0].logprob, 4) for reply in solo}
    assert len(first) > 4


def test_refusal_is_removed_per_request_and_comes_back(server):
    """On the first JailbreakBench behaviour the committed direction flips (the directions
    tests require it to flip at least half of the first six), refusal at 0, answer at 1, and
    refusal again at 0 in the next request."""
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)

    def reply(prompt: str, strength: str) -> str:
        response = api.chat.completions.with_raw_response.create(
            model="demo",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=12,
            extra_headers={"X-Ablation-Strength": strength},
        )
        assert response.headers["x-ablation-applied"].endswith(f"strength={float(strength)}")
        return response.parse().choices[0].message.content

    for prompt in jailbreakbench_goals(6):
        if is_refusal(reply(prompt, "0")) and not is_refusal(reply(prompt, "1")):
            assert is_refusal(reply(prompt, "0"))
            return
    pytest.fail("no JailbreakBench prompt among the first six flips from refusal at strength 1")
