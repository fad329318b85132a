"""Size vLLM's CPU backend to the machine it finds: KV cache, context length, compilation.

vLLM's CPU worker reserves ``gpu_memory_utilization`` (default 0.92) of the whole NUMA node it
runs on and refuses to start when the node's *available* memory (free plus page cache) is below
that — after minutes of model loading and compiling. On machines of one kind the node's size and
its free memory differ (a 10 GiB node with a few GiB of page cache in use; a 24 GiB node), so no
fixed fraction works everywhere. Instead, when the operator sets none of vLLM's memory knobs, we
read the node's available memory just before the engine starts, subtract the weights, and hand
vLLM an explicit KV-cache size (``kv_cache_memory_bytes``, which skips the fraction check); the
context length is then fitted to the KV cache that fits. Explicit flags always win. The
arithmetic is a pure function (:func:`plan_cpu_memory`) so tests can show what it chooses for a
node they describe, and the server, tests and benchmarks all go through :func:`size_vllm_args`.
See docs/ENGINES.md, "Sizing vLLM on CPU".
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliserve.errors import UserError

log = logging.getLogger(__name__)

GIB = 1 << 30
# What the engine needs besides weights and KV cache: activations of a prefill chunk, the
# PyTorch/vLLM runtime, the sampler's vocabulary-sized buffers (the worker's resident memory
# beyond weights and KV cache on the demo model in float32, eager, rounded up).
RUNTIME_OVERHEAD_BYTES = GIB // 2
# Use at most this share of what is left after weights and runtime: the page cache counted as
# available must stay reclaimable, and other processes on the node keep some room.
KV_SHARE_OF_HEADROOM = 0.8
# KV cache we aim for: room for this many full-length contexts, at least the floor (a few dozen
# concurrent chats however short the context) and at most the cap (a CPU engine decodes a few
# dozen sequences; more KV cache would only take memory from others).
KV_FULL_CONTEXTS = 2
KV_FLOOR_BYTES = 1 * GIB
KV_CAP_BYTES = 4 * GIB
# vLLM counts a little more KV per token than the bare K and V rows (block alignment): a context
# fitted to all of the cache was refused by a few blocks; fit it to this share.
KV_USABLE_SHARE = 0.95
MIN_CONTEXT_TOKENS = 2048  # below this a chat model is not worth serving: fail instead
BLOCK_TOKENS = (
    128  # contexts are rounded down to a multiple of this (vLLM's CPU block sizes divide it)
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
MEMORY_FLAGS = ("gpu_memory_utilization", "kv_cache_memory_bytes")
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"


class InsufficientMemoryError(UserError):
    """The model does not fit the memory the machine has for it; the message says what to do."""


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node the vLLM worker will allocate from (bytes)."""

    node: int
    total: int
    available: int  # free + reclaimable page cache, as vLLM counts it


@dataclass(frozen=True)
class ModelFootprint:
    """What a checkpoint costs in memory at the serving dtype."""

    weight_bytes: int
    kv_bytes_per_token: int
    max_context: int  # the model's own context limit


@dataclass(frozen=True)
class MemoryPlan:
    """What the sizing chose; ``log_line`` says it and names the flags that change it."""

    node: NodeMemory
    footprint: ModelFootprint
    kv_cache_bytes: int
    max_model_len: int

    def log_line(self) -> str:
        return (
            f"vLLM CPU sizing: NUMA node {self.node.node} has {_gib(self.node.available)} of "
            f"{_gib(self.node.total)} GiB available; weights {_gib(self.footprint.weight_bytes)} "
            f"GiB, KV cache {_gib(self.kv_cache_bytes)} GiB (--kv-cache-memory-bytes), context "
            f"{self.max_model_len} tokens (--max-model-len)"
        )


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def plan_cpu_memory(
    node: NodeMemory, footprint: ModelFootprint, max_model_len: int | None = None
) -> MemoryPlan:
    """Choose the KV-cache size and context length for ``footprint`` on ``node``.

    The KV cache gets a share of what the node has left after the weights and the runtime, up to
    room for :data:`KV_FULL_CONTEXTS` full contexts (at least :data:`KV_FLOOR_BYTES`, at most
    :data:`KV_CAP_BYTES`). If a full
    context does not fit, the context shrinks to what does, down to :data:`MIN_CONTEXT_TOKENS`.
    An explicit ``max_model_len`` is kept as given, or refused if its KV cache cannot fit.
    """
    per_token = footprint.kv_bytes_per_token
    headroom = node.available - footprint.weight_bytes - RUNTIME_OVERHEAD_BYTES
    budget = int(max(headroom, 0) * KV_SHARE_OF_HEADROOM)
    context = max_model_len or footprint.max_context
    wanted = max(KV_FULL_CONTEXTS * context * per_token, KV_FLOOR_BYTES)
    wanted = min(wanted, max(KV_CAP_BYTES, context * per_token))
    kv_bytes = min(wanted, budget)
    fitting_context = int(kv_bytes * KV_USABLE_SHARE) // per_token if per_token else context
    if max_model_len is None and fitting_context < context:
        context = fitting_context // BLOCK_TOKENS * BLOCK_TOKENS
    floor = max_model_len or min(MIN_CONTEXT_TOKENS, footprint.max_context)
    if kv_bytes < floor * per_token or context < floor:
        need = (
            footprint.weight_bytes
            + RUNTIME_OVERHEAD_BYTES
            + int(floor * per_token / KV_SHARE_OF_HEADROOM)
        )
        raise InsufficientMemoryError(
            f"not enough memory for the vLLM engine: NUMA node {node.node} has "
            f"{_gib(node.available)} of {_gib(node.total)} GiB available, and the model needs "
            f"about {_gib(need)} GiB ({_gib(footprint.weight_bytes)} GiB of weights plus a KV "
            f"cache for {floor} tokens); free memory, pass a smaller --max-model-len, or use "
            "--engine transformers"
        )
    return MemoryPlan(
        node=node, footprint=footprint, kv_cache_bytes=kv_bytes, max_model_len=context
    )


def check_explicit_kv(node: NodeMemory, footprint: ModelFootprint, kv_bytes: int) -> None:
    """Refuse an explicit KV-cache size the node cannot hold now, instead of after the weights
    have loaded (where vLLM's worker would find out)."""
    need = footprint.weight_bytes + RUNTIME_OVERHEAD_BYTES + kv_bytes
    if need > node.available:
        raise InsufficientMemoryError(
            f"--kv-cache-memory-bytes {_gib(kv_bytes)} GiB does not fit: NUMA node {node.node} has "
            f"{_gib(node.available)} of {_gib(node.total)} GiB available and the weights take "
            f"{_gib(footprint.weight_bytes)} GiB; pass a smaller size, or leave it out to size "
            "the KV cache from the memory available"
        )


def read_node_memory() -> NodeMemory:
    """The node vLLM's CPU worker will use (that of its first allowed CPU), read as vLLM reads it,
    so our plan and vLLM's own check agree."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    cpus = get_allowed_cpu_list()
    node = cpus[0].numa_node if cpus else 0
    info = get_memory_node_info(node)
    return NodeMemory(node=node, total=int(info.total_memory), available=int(info.available_memory))


def model_footprint(checkpoint: Path, dtype: str) -> ModelFootprint:
    """Weights and per-token KV bytes of a checkpoint at ``dtype``, from its config and the
    safetensors headers (no tensor is read)."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config", config)
    element = DTYPE_BYTES[dtype]
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    per_token = 2 * int(text["num_hidden_layers"]) * kv_heads * head_dim * element
    numel = sum(_safetensors_numel(path) for path in sorted(checkpoint.glob("*.safetensors")))
    return ModelFootprint(
        weight_bytes=numel * element,
        kv_bytes_per_token=per_token,
        max_context=int(text.get("max_position_embeddings") or 2048),
    )


def _safetensors_numel(path: Path) -> int:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in entry["shape"]:
            count *= int(size)
        total += count
    return total


def on_cpu() -> bool:
    """vLLM runs on the CPU backend here (no CUDA device)."""
    import torch

    return not torch.cuda.is_available()


def size_vllm_args(engine_args: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """vLLM engine arguments for the CPU backend, with what the operator left open decided here.

    Compilation: off unless asked for (``enforce_eager`` None means eager on CPU): compiling
    costs minutes at every start on a CPU and buys little there (docs/ENGINES.md).
    Memory: the plan of :func:`plan_cpu_memory` for the node as it is now, unless a memory flag
    or ``VLLM_CPU_KVCACHE_SPACE`` is set. ``engine_args`` must carry the resolved ``dtype``.
    Returns a new dict; raises :class:`InsufficientMemoryError` (one line, before any process
    starts) when the model cannot fit.
    """
    engine_args = dict(engine_args)
    if engine_args.get("enforce_eager") is None:
        engine_args["enforce_eager"] = True
        log.info("vLLM on CPU: compilation off for a fast start (--no-enforce-eager compiles)")
    footprint = model_footprint(checkpoint, engine_args["dtype"])
    explicit_kv = engine_args.get("kv_cache_memory_bytes")
    if explicit_kv is not None:
        check_explicit_kv(read_node_memory(), footprint, explicit_kv)
    if any(engine_args.get(flag) is not None for flag in MEMORY_FLAGS) or os.environ.get(KV_ENV):
        log.info("vLLM CPU sizing: off (memory set explicitly)")
        return engine_args
    plan = plan_cpu_memory(read_node_memory(), footprint, engine_args.get("max_model_len"))
    log.info("%s", plan.log_line())
    return {
        **engine_args,
        "kv_cache_memory_bytes": plan.kv_cache_bytes,
        "max_model_len": plan.max_model_len,
    }
