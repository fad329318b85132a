"""The vLLM engine: abliserve's engine interface over vLLM's ``AsyncLLM`` (V1), the production path.

Our FastAPI front end stays in charge of HTTP, chat templates, policy and errors (one API for
both engines); vLLM gets token ids (``TokensPrompt``) and streams new token ids back
(``RequestOutputKind.DELTA``, no detokenisation). Ablation happens inside vLLM's batches through
the plugin of :mod:`abliserve.server.engines.vllm_plugin`; this module only

* hands the plugin the direction bank (``additional_config``, also the compile-cache salt),
* tags each request with its bank slot and strength (``SamplingParams.extra_args``),
* salts the prefix cache for ablated requests (``AblationSpec.cache_salt()``): their K/V differ
  from the baseline's, while baseline requests keep sharing cached prefixes, and
* loads directions at run time: the artifact is staged on disk and every worker copies it into
  a free bank slot in place (``collective_rpc``), between two engine steps.

An engine built with ``max_directions=0`` is plain vLLM: the plugin installs nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from abliserve.architectures import WriterSpec
from abliserve.demo_model import cache_root
from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.server.engines.base import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationChunk,
    GenerationRequest,
    HeldSlot,
    TokenLogprob,
)
from abliserve.server.engines.direction_slots import DEFAULT_MAX_DIRECTIONS
from abliserve.server.engines.vllm_cpu_sizing import on_cpu, size_vllm_args
from abliserve.server.engines.vllm_plugin import (
    WRITE_SLOT_METHOD,
    force_v1_runner,
    plugin_config,
    stage_artifact,
)
from abliserve.server.engines.vllm_routing import ablation_extra_args

log = logging.getLogger(__name__)


def vllm_dtype(name: str) -> str:
    """``auto`` means float32 on CPU, as in the transformers engine: vLLM's own ``auto`` takes the
    checkpoint's bf16, which CPUs without AVX512-BF16 emulate slowly (and the two engines would
    then disagree on tokens)."""
    return "float32" if name == "auto" and on_cpu() else name


class VllmEngine(Engine):
    """Serve one checkpoint with vLLM, any of ``directions`` removable per request."""

    name = "vllm"

    def __init__(
        self,
        checkpoint: Path,
        identity: ModelIdentity,
        directions: dict[str, DirectionArtifact],
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        writers: WriterSpec | None = None,
        max_directions: int = DEFAULT_MAX_DIRECTIONS,
    ) -> None:
        super().__init__(identity, directions, max_directions)
        self.checkpoint = Path(checkpoint)
        self.stage_dir = cache_root() / "vllm-directions"
        self.engine_args: dict[str, Any] = {
            "model": str(self.checkpoint),
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len,
            "dtype": vllm_dtype(dtype),
            "enable_prefix_caching": enable_prefix_caching,
            "seed": seed,
            # The first-token KL endpoint (POST /v1/ab/first-token) asks for the whole
            # vocabulary's log-probabilities of one token (full_distribution); the HTTP layer
            # caps what clients may ask for (top_logprobs <= 20), so lifting vLLM's own cap
            # exposes nothing more. vLLM hands them over as one Python object per token, the
            # cost docs/RELIABILITY.md records for that endpoint on this engine.
            "max_logprobs": -1,
        }
        if gpu_memory_utilization is not None:
            self.engine_args["gpu_memory_utilization"] = gpu_memory_utilization
        if enforce_eager is not None:  # None: vLLM's default (on CPU: eager, vllm_cpu_sizing)
            self.engine_args["enforce_eager"] = enforce_eager
        if kv_cache_memory_bytes is not None:
            self.engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_num_seqs is not None:
            self.engine_args["max_num_seqs"] = max_num_seqs
        if max_directions > 0:
            self.engine_args["additional_config"] = plugin_config(
                directions, self.stage_dir, writers, max_directions
            )
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._max_model_len = 0
        self._vocab_size = 0

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def client(self) -> Any:
        """The running ``AsyncLLM`` (vLLM's ``EngineClient``), for vLLM's own OpenAI serving."""
        if self._llm is None:
            raise EngineError("the engine is not running")
        return self._llm

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        force_v1_runner()
        engine_args = self.engine_args
        if on_cpu():
            engine_args = size_vllm_args(engine_args, self.checkpoint)
        args = AsyncEngineArgs(**engine_args, disable_log_stats=True)
        self._llm = AsyncLLM.from_engine_args(args)
        model_config = self._llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        log.info("vLLM engine ready: %s, directions %s", self.checkpoint, list(self.directions))

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def _write_slot(self, slot: int, artifact: DirectionArtifact) -> None:
        path = stage_artifact(artifact, self.stage_dir)
        await self.client.collective_rpc(WRITE_SLOT_METHOD, args=(str(path), slot))

    def sampling_params(self, request: GenerationRequest, held: HeldSlot) -> Any:
        """vLLM ``SamplingParams`` for one request, carrying its ablation (the bank slot ``held``
        by the caller) in ``extra_args``."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options, ablation = request.sampling, request.ablation
        return SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop_token_ids=list(options.stop_token_ids),
            logprobs=-1 if options.full_distribution else options.logprobs,
            ignore_eos=options.ignore_eos,
            top_k=options.top_k,
            min_p=options.min_p,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty,
            logit_bias=dict(options.logit_bias) or None,
            min_tokens=options.min_tokens,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=ablation_extra_args(held.slot, ablation.strength),
        )

    def prompt_inputs(self, request: GenerationRequest, held: HeldSlot) -> Any:
        """vLLM ``TokensPrompt`` of one request, salted for ablated requests so their K/V never
        share prefix-cache blocks with another (direction, strength) or another load."""
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if held.cache_salt is not None:
            prompt["cache_salt"] = held.cache_salt
        return prompt

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._llm is None:
            raise EngineError("the engine is not running")
        if (reason := self.stopped()) is not None:
            raise EngineStoppedError(reason)
        self.check_request(request, self._vocab_size)
        with self.holding(request.ablation) as held:
            async with aclosing(self._stream(request, held)) as stream:
                async for chunk in stream:
                    yield chunk

    async def _stream(
        self, request: GenerationRequest, held: HeldSlot
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = self.prompt_inputs(request, held)
        params = self.sampling_params(request, held)
        finished = False
        try:
            async for output in self._llm.generate(prompt, params, request.request_id):
                completion = output.outputs[0]
                finished = output.finished
                yield GenerationChunk(
                    token_ids=list(completion.token_ids),
                    logprobs=_logprobs(completion, request.sampling.logprobs),
                    finish_reason=completion.finish_reason if finished else None,
                    distribution=(
                        _distribution(completion, self._vocab_size)
                        if request.sampling.full_distribution
                        else None
                    ),
                )
        except EngineDeadError as error:
            raise EngineStoppedError(f"the vLLM engine stopped: {error}") from error
        finally:
            if not finished:
                await self.abort(request.request_id)

    def stopped(self) -> str | None:
        if self._llm is not None and self._llm.errored:
            return (
                "the vLLM engine stopped (an engine or worker process died; the server log "
                "says why); restart the server"
            )
        return None

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)


def _logprobs(completion: Any, top: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token {token id: Logprob(logprob, rank)} as our chosen-token + top-k record."""
    if top is None or completion.logprobs is None:
        return None
    records = []
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs, strict=True):
        records.append(
            TokenLogprob(
                token_id=token_id,
                logprob=float(alternatives[token_id].logprob),
                top={
                    other: float(entry.logprob)
                    for other, entry in alternatives.items()
                    if entry.rank is not None and entry.rank <= top
                },
            )
        )
    return records


def _distribution(completion: Any, vocab_size: int) -> Any:
    """The first new token's whole log-probability vector, from vLLM's {token id: Logprob}."""
    import torch

    if not completion.logprobs:
        return None
    alternatives = completion.logprobs[0]
    distribution = torch.full((vocab_size,), -math.inf)
    ids = torch.tensor(list(alternatives.keys()))
    distribution[ids] = torch.tensor([entry.logprob for entry in alternatives.values()])
    return distribution
