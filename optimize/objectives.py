"""The two objectives, measured through a running engine, many candidates at once.

- **refusal rate**: greedy completions (``max_new_tokens``) of the harmful validation prompts,
  counted with the JailbreakBench markers (heretic's list is recorded as a second opinion);
- **first-token KL**: mean KL(baseline ‖ ablated) of the whole first-token distribution on
  the harmless prompts.

Every request of every candidate in a round is sent at once, so the engine batches rows of
different directions together (docs/ARCHITECTURE.md, the request path); the baseline is
measured once and reused for every round.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass

import torch
from tqdm import tqdm

from abliserve.refusal import MarkerList, is_refusal
from abliserve.server.ab import kl_divergence
from abliserve.server.engines.base import (
    BASELINE,
    AblationSpec,
    Engine,
    EngineError,
    GenerationRequest,
    SamplingOptions,
)

# First-token requests in flight at once. A whole-vocabulary distribution is large on its way
# out of an engine (vLLM hands it over as one Python object per token, about 13 MiB per
# request), so hundreds at once exhaust memory; generations queue in the engine instead.
FIRST_TOKEN_CONCURRENCY = 8


@dataclass(frozen=True)
class Scores:
    """A candidate's validation scores (both objectives are minimised)."""

    refusal_rate: float
    kl: float
    refusal_rate_heretic: float
    completions: tuple[str, ...] = ()

    def summary(self) -> dict[str, float]:
        return {
            "refusal_rate": self.refusal_rate,
            "kl": self.kl,
            "refusal_rate_heretic": self.refusal_rate_heretic,
        }


class EngineObjectives:
    """Validation prompts (token ids, chat template applied) and the baseline's first-token
    distributions; :meth:`score` measures any directions the engine has loaded."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        harmful: Sequence[str],
        harmless: Sequence[str],
        max_new_tokens: int,
    ) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.harmful = [self._chat(text) for text in harmful]
        self.harmless = [self._chat(text) for text in harmless]
        self.max_new_tokens = max_new_tokens
        self._baseline: list[torch.Tensor] | None = None
        self._first_token_slots = asyncio.Semaphore(FIRST_TOKEN_CONCURRENCY)

    def _chat(self, text: str) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )

    async def baseline(self) -> Scores:
        """The unablated model's scores (KL 0); its first-token distributions are kept as the
        reference every candidate's KL is measured against."""
        completions, distributions = await self._measure([BASELINE], "baseline")
        self._baseline = distributions[0]
        return self._scores(completions[0], distributions[0])

    async def score(self, names: Sequence[str]) -> list[Scores]:
        """Scores of the loaded directions ``names`` at strength 1, measured side by side."""
        if self._baseline is None:
            await self.baseline()
        specs = [AblationSpec(name, 1.0) for name in names]
        completions, distributions = await self._measure(specs, f"{len(specs)} candidates")
        return [
            self._scores(texts, dists)
            for texts, dists in zip(completions, distributions, strict=True)
        ]

    async def _measure(
        self, specs: list[AblationSpec], description: str
    ) -> tuple[list[list[str]], list[list[torch.Tensor]]]:
        """Completions and first-token distributions of every spec, all requests at once."""
        requests = [self._complete(p, spec) for spec in specs for p in self.harmful]
        requests += [self._first_token(p, spec) for spec in specs for p in self.harmless]
        with tqdm(total=len(requests), desc=description, unit="req", leave=False) as bar:

            async def counted(request):
                result = await request
                bar.update()
                return result

            results = await asyncio.gather(*(counted(r) for r in requests))
        split = len(specs) * len(self.harmful)
        return (
            _split(results[:split], len(self.harmful)),
            _split(results[split:], len(self.harmless)),
        )

    def _scores(self, texts: list[str], distributions: list[torch.Tensor]) -> Scores:
        assert self._baseline is not None
        kls = [
            kl_divergence(reference, other)
            for reference, other in zip(self._baseline, distributions, strict=True)
        ]
        return Scores(
            refusal_rate=sum(is_refusal(t) for t in texts) / len(texts),
            kl=statistics.fmean(kls),
            refusal_rate_heretic=sum(is_refusal(t, MarkerList.HERETIC) for t in texts) / len(texts),
            completions=tuple(texts),
        )

    async def _complete(self, prompt: list[int], spec: AblationSpec) -> str:
        sampling = SamplingOptions(max_tokens=self.max_new_tokens, temperature=0.0)
        tokens: list[int] = []
        async with self._run(prompt, spec, sampling) as chunks:
            async for chunk in chunks:
                tokens += chunk.token_ids
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    async def _first_token(self, prompt: list[int], spec: AblationSpec) -> torch.Tensor:
        sampling = SamplingOptions(
            max_tokens=1, temperature=0.0, ignore_eos=True, full_distribution=True
        )
        async with self._first_token_slots, self._run(prompt, spec, sampling) as chunks:
            async for chunk in chunks:
                if chunk.distribution is not None:
                    return chunk.distribution
        raise EngineError("the engine returned no first-token distribution")

    def _run(self, prompt: list[int], spec: AblationSpec, sampling: SamplingOptions):
        request = GenerationRequest(uuid.uuid4().hex, prompt, sampling, spec)
        return aclosing(self.engine.generate(request))


def _split(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]
