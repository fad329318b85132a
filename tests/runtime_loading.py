"""Scenarios for loading and removing directions while an engine serves, shared by the
transformers engine tests (tiny model) and the vLLM engine tests (demo model).

Each scenario runs the same requests undisturbed and disturbed (a direction loaded or removed
once every request has streamed its first tokens) and returns both token lists; the tests
assert they are equal and that the disturbance happened where it should.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from abliserve.directions.artifact import DirectionArtifact
from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    Engine,
    GenerationRequest,
    SamplingOptions,
)

Job = tuple[list[int], AblationSpec]


def greedy_request(
    prompt: list[int], ablation: AblationSpec, request_id: str, tokens: int
) -> GenerationRequest:
    sampling = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(request_id, prompt, sampling, ablation)


async def run_jobs(
    engine: Engine,
    jobs: list[Job],
    tag: str,
    tokens: int,
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[list[int]]:
    """Greedy token ids of ``jobs`` run concurrently; ``during`` runs once every job has
    received its first tokens, while they all still stream."""
    started = [asyncio.Event() for _ in jobs]

    async def consume(index: int, request: GenerationRequest) -> list[int]:
        ids: list[int] = []
        async for chunk in engine.generate(request):
            ids += chunk.token_ids
            started[index].set()
        started[index].set()
        return ids

    tasks = [
        asyncio.create_task(consume(i, greedy_request(p, a, f"{tag}-{i}", tokens)))
        for i, (p, a) in enumerate(jobs)
    ]
    if during is not None:
        await asyncio.gather(*(event.wait() for event in started))
        await during()
    return list(await asyncio.gather(*tasks))


@dataclass
class LoadResult:
    undisturbed: list[list[int]]
    disturbed: list[list[int]]
    held_while_loading: list[int]  # requests holding each job's slot when the load ran
    loaded: list[int]  # tokens of the first job's prompt with the loaded direction
    same_loaded_at_start: list[int]  # ... with the same artifact loaded at start
    baseline: list[int]  # ... without ablation


async def load_while_streaming(
    engine: Engine,
    jobs: list[Job],
    name: str,
    artifact: DirectionArtifact,
    twin_at_start: str,
    tokens: int,
) -> LoadResult:
    """Load ``artifact`` as ``name`` while ``jobs`` stream; then compare it with
    ``twin_at_start``, the same artifact loaded when the engine started."""
    undisturbed = await run_jobs(engine, jobs, f"{name}-undisturbed", tokens)
    held: list[int] = []

    async def load() -> None:
        slots = engine.direction_slots
        held.extend(slots.holders(slots.slot(a.direction)) if a.active else 0 for _, a in jobs)
        await engine.add_direction(name, artifact)

    disturbed = await run_jobs(engine, jobs, f"{name}-disturbed", tokens, during=load)
    prompt = jobs[0][0]
    trio = [
        (prompt, AblationSpec(name, 1.0)),
        (prompt, AblationSpec(twin_at_start, 1.0)),
        (prompt, BASELINE),
    ]
    loaded, twin, baseline = await run_jobs(engine, trio, f"{name}-twin", tokens)
    await engine.remove_direction(name)
    return LoadResult(undisturbed, disturbed, held, loaded, twin, baseline)


@dataclass
class RemoveResult:
    undisturbed: list[int]
    disturbed: list[int]
    baseline: list[int]
    removed_slot: int
    slot_of_next: int  # the slot a direction loaded while the removed one was held got
    holders_after: int  # requests holding the removed slot once its request finished
    slot_after_release: int  # the slot the next direction gets once it is free


async def remove_while_streaming(
    engine: Engine,
    prompt: list[int],
    name: str,
    artifact: DirectionArtifact,
    other: DirectionArtifact,
    tokens: int,
) -> RemoveResult:
    """Load ``artifact`` as ``name``, stream with it, and remove it mid-stream; load ``other``
    while the removed slot is still held."""
    await engine.add_direction(name, artifact)
    slot = engine.direction_slots.slot(name)
    job = [(prompt, AblationSpec(name, 1.0))]
    (undisturbed,) = await run_jobs(engine, job, f"{name}-alone", tokens)
    next_slot: list[int] = []

    async def remove_and_load() -> None:
        await engine.remove_direction(name)
        await engine.add_direction(f"{name}-next", other)
        next_slot.append(engine.direction_slots.slot(f"{name}-next"))

    (disturbed,) = await run_jobs(engine, job, f"{name}-removed", tokens, during=remove_and_load)
    holders_after = engine.direction_slots.holders(slot)
    await engine.add_direction(f"{name}-after", other)
    after = engine.direction_slots.slot(f"{name}-after")
    (baseline,) = await run_jobs(engine, [(prompt, BASELINE)], f"{name}-baseline", tokens)
    for leftover in (f"{name}-next", f"{name}-after"):
        await engine.remove_direction(leftover)
    return RemoveResult(undisturbed, disturbed, baseline, slot, next_slot[0], holders_after, after)
