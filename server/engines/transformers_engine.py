"""The transformers engine: continuous batching of a Hugging Face causal LM with per-row ablation.

One background thread owns the model and runs the loop (the asyncio event loop never waits on
torch):

    while requests exist:
        admit waiting requests into free slots (up to ``max_num_seqs`` rows);
        prefill them together (left padding, attention mask, per-row position ids) into a
        fresh KV cache, sample each one's first token, and merge that cache into the running
        batch (:class:`KVBatch`);
        decode one token for every running row;
        drop rows that finished or were aborted.

Every forward sets the ablation hooks per row (direction slot and strength from the request),
so requests with different strengths and directions share one forward pass. Each row samples
from its own logits with its own generator; padding is masked and positions are per row, so a
greedy request yields the tokens it yields alone. Attention runs
"eager" by default: its masked softmax gives exact zeros for padding.

Tokens travel to the request's asyncio queue with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from abliserve.architectures import WriterSpec
from abliserve.bank import DirectionBank
from abliserve.directions.artifact import DirectionArtifact, ModelIdentity
from abliserve.projection import site_names
from abliserve.server.engines.base import (
    Engine,
    EngineError,
    EngineStoppedError,
    GenerationChunk,
    GenerationRequest,
)
from abliserve.server.engines.direction_slots import DEFAULT_MAX_DIRECTIONS
from abliserve.server.engines.kv_batch import KVBatch, check_supported, sliding_window_limit
from abliserve.server.engines.sampling import (
    make_generator,
    processed_logits,
    sample_token,
    token_logprob,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Emit = Callable[[GenerationChunk | BaseException], None]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matmuls there are slow and lossy) and bf16 on GPUs."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class _Pending:
    request: GenerationRequest
    emit: Emit
    slot: int  # the bank slot of its direction, held until the request ends


@dataclass
class _Row:
    """A running request: one row of the batch."""

    request: GenerationRequest
    emit: Emit
    slot: int
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    position: int  # position id of last_token, the token the next decode step feeds
    last_token: int = 0
    output_ids: list[int] = field(default_factory=list)  # for penalties and min_tokens


class TransformersEngine(Engine):
    """Serve one Hugging Face checkpoint with any of ``directions`` removable per request."""

    name = "transformers"

    def __init__(
        self,
        checkpoint: Path,
        identity: ModelIdentity,
        directions: dict[str, DirectionArtifact],
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str = "eager",
        writers: WriterSpec | None = None,
        max_directions: int = DEFAULT_MAX_DIRECTIONS,
    ) -> None:
        super().__init__(identity, directions, max_directions)
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        self.checkpoint = Path(checkpoint)
        self.max_num_seqs = max_num_seqs
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.attn_implementation = attn_implementation
        self.writers = writers
        self._requested_max_len = max_model_len
        self._max_model_len = 0
        self.vocab_size = 0
        self.model: torch.nn.Module | None = None
        self.bank = DirectionBank.from_artifacts(
            directions, len(site_names(identity.num_layers)), identity.hidden_size, max_directions
        )
        self._eos_ids: frozenset[int] = frozenset()
        self._cond = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._active: set[str] = set()  # ids waiting or running (guarded by _cond)
        self._aborted: set[str] = set()
        self._stopping = False
        self._death: str | None = None  # why the engine thread ended unasked, once it has
        self._thread: threading.Thread | None = None
        # Owned by the loop thread only:
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._hooks = None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._loop, name="abliserve-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        from abliserve.hooks import AblationHooks
        from abliserve.selfcheck import check_writers

        model = AutoModelForCausalLM.from_pretrained(
            self.checkpoint, dtype=self.dtype, attn_implementation=self.attn_implementation
        )
        model.to(self.device).eval()
        config = model.config.get_text_config(decoder=True)
        limit = min(int(config.max_position_embeddings), sliding_window_limit(model.config))
        self._max_model_len = min(self._requested_max_len or limit, limit)
        self.vocab_size = int(config.vocab_size)
        eos: set[int] = set()
        for source in (model.generation_config, model.config):
            value = getattr(source, "eos_token_id", None)
            eos.update([value] if isinstance(value, int) else value or [])
        self._eos_ids = frozenset(eos)
        check_writers(model, self.writers)  # refuse to serve a model ablated inexactly
        self._hooks = AblationHooks(model, self.bank, self.writers)
        self.bank = self._hooks.bank  # the copy on the model's device, which the hooks read
        self.model = model

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._hooks is not None:
            self._hooks.remove()
        self.model = None

    def stopped(self) -> str | None:
        return self._death

    async def _write_slot(self, slot: int, artifact: DirectionArtifact) -> None:
        # The engine thread may be mid-forward: it reads only the slots of running rows, and a
        # slot being written is held by none of them.
        self.bank.write(slot, artifact)

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"running": float(len(self._rows)), "waiting": float(len(self._waiting))}

    # -- requests (event-loop side) -----------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._death is not None:
            raise EngineStoppedError(self._death)
        if self.model is None:
            raise EngineError("the engine is not running")
        self.check_request(request, self.vocab_size)
        with self.holding(request.ablation) as held:
            async with aclosing(self._stream(request, held.slot)) as stream:
                async for chunk in stream:
                    yield chunk

    async def _stream(
        self, request: GenerationRequest, slot: int
    ) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()

        def emit(item: GenerationChunk | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        with self._cond:
            if self._death is not None:  # died since the check above
                raise EngineStoppedError(self._death)
            if request.request_id in self._active:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._active.add(request.request_id)
            self._waiting.append(_Pending(request, emit, slot))
            self._cond.notify_all()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._active:
                self._aborted.add(request_id)
                self._cond.notify_all()

    # -- the loop (engine thread) -------------------------------------------------------------

    def _loop(self) -> None:
        """Run :meth:`_serve`; if it ends by anything but a shutdown (a bug, an interpreter
        error), record why and fail every request, so nothing waits on a thread that is gone
        and the server's watchdog sees a stopped engine."""
        try:
            self._serve()
        except BaseException as error:
            with self._cond:
                self._death = f"the engine thread died ({type(error).__name__}: {error})"
            log.critical("%s", self._death)
            self._fail_everything(EngineStoppedError(self._death))

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._rows or self._aborted):
                        self._cond.wait()
                    if self._stopping:
                        break
                    aborted, self._aborted = self._aborted, set()
                    for pending in [p for p in self._waiting if p.request.request_id in aborted]:
                        self._waiting.remove(pending)
                        self._finish_id(pending.request.request_id)
                    free = self.max_num_seqs - len(self._rows)
                    admitted = [
                        self._waiting.popleft() for _ in range(min(free, len(self._waiting)))
                    ]
                self._drop_rows(
                    {i for i, row in enumerate(self._rows) if row.request.request_id in aborted}
                )
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                except Exception as error:  # keep serving: fail only the requests in this batch
                    log.exception("engine step failed; failing %d request(s)", len(self._rows))
                    failure = EngineError(f"generation failed: {type(error).__name__}: {error}")
                    failed = [(row.request.request_id, row.emit) for row in self._rows]
                    failed += [(p.request.request_id, p.emit) for p in admitted]
                    self._rows, self._batch = [], None
                    for request_id, emit in failed:
                        emit(failure)
                        self._finish_id(request_id)
        self._fail_everything(EngineError("the server is shutting down"))

    def _fail_everything(self, error: EngineError) -> None:
        with self._cond:
            pending = [(p.request.request_id, p.emit) for p in self._waiting]
            self._waiting.clear()
        for request_id, emit in pending + [(r.request.request_id, r.emit) for r in self._rows]:
            emit(error)
            self._finish_id(request_id)
        self._rows, self._batch = [], None

    def _finish_id(self, request_id: str) -> None:
        with self._cond:
            self._active.discard(request_id)

    def _set_ablation(self, rows: list[_Pending] | list[_Row]) -> None:
        slots = [row.slot for row in rows]
        strengths = [row.request.ablation.strength if row.slot else 0.0 for row in rows]
        self._hooks.set_rows(torch.tensor(slots), torch.tensor(strengths))

    def _prefill(self, admitted: list[_Pending]) -> None:
        """Run the new prompts as one left-padded batch and merge their cache into ours."""
        from transformers import DynamicCache

        lengths = [len(p.request.prompt_token_ids) for p in admitted]
        width = max(lengths)
        input_ids = torch.zeros(len(admitted), width, dtype=torch.long)
        mask = torch.zeros(len(admitted), width, dtype=torch.long)
        for i, pending in enumerate(admitted):
            input_ids[i, width - lengths[i] :] = torch.tensor(pending.request.prompt_token_ids)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()  # full-attention layers; sliding windows are capped, see above
        check_supported(cache)
        self._set_ablation(admitted)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = output.logits[:, -1, :].float()
        new_rows = []
        for i, pending in enumerate(admitted):
            request = pending.request
            row = _Row(
                request=request,
                emit=pending.emit,
                slot=pending.slot,
                generator=make_generator(request.sampling, self.device),
                stop_ids=frozenset(request.sampling.stop_token_ids)
                | (frozenset() if request.sampling.ignore_eos else self._eos_ids),
                position=lengths[i] - 1,  # the first sampled token goes at lengths[i]
            )
            new_rows.append(row)
        batch = KVBatch(cache=cache, mask=mask.to(self.device))
        finished = self._advance(new_rows, logits)
        keep = [i for i in range(len(new_rows)) if i not in finished]
        if len(keep) < len(new_rows):
            if not keep:
                return
            batch.keep_rows(keep)
        new_rows = [new_rows[i] for i in keep]
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.append(batch)
        self._rows += new_rows

    def _decode(self) -> None:
        """One token for every running row."""
        assert self._batch is not None
        input_ids = torch.tensor([[row.last_token] for row in self._rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self._rows], device=self.device)
        mask = self._batch.extend_mask()
        self._set_ablation(self._rows)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._batch.cache,
            use_cache=True,
        )
        finished = self._advance(self._rows, output.logits[:, -1, :].float())
        self._drop_rows(finished)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> set[int]:
        """Sample each row's next token, stream it, and return the indices that finished."""
        finished = set()
        for i, row in enumerate(rows):
            sampling = row.request.sampling
            processed = processed_logits(
                logits[i], sampling, row.request.prompt_token_ids, row.output_ids, row.stop_ids
            )
            token = sample_token(processed, sampling, row.generator)
            chunk = GenerationChunk(token_ids=[])
            if sampling.full_distribution:
                chunk.distribution = torch.log_softmax(logits[i], dim=-1).cpu()
            if token in row.stop_ids:
                chunk.finish_reason = "stop"
            else:
                chunk.token_ids = [token]
                if sampling.logprobs is not None:
                    chunk.logprobs = [token_logprob(logits[i], token, sampling.logprobs)]
                row.output_ids.append(token)
                row.last_token = token
                row.position += 1
                if (
                    len(row.output_ids) >= sampling.max_tokens
                    or row.position + 1 >= self._max_model_len
                ):
                    chunk.finish_reason = "length"
            if chunk.finish_reason is not None:
                finished.add(i)
                self._finish_id(row.request.request_id)
            row.emit(chunk)
        return finished

    def _drop_rows(self, indices: set[int]) -> None:
        """Remove finished or aborted rows from the batch (and tell aborted consumers)."""
        if not indices:
            return
        for i in indices:
            row = self._rows[i]
            with self._cond:
                still_active = row.request.request_id in self._active
            if still_active:  # aborted, not finished: close the stream for anyone listening
                row.emit(GenerationChunk(token_ids=[], finish_reason="abort"))
                self._finish_id(row.request.request_id)
        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            assert self._batch is not None
            self._batch.keep_rows(keep)
