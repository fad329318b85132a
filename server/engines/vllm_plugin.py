"""vLLM plugin: per-token directional ablation inside vLLM's continuous batches (docs/ENGINES.md).

vLLM calls :func:`register` in every process it starts (front end, engine core, each worker),
through this package's ``vllm.general_plugins`` entry point. It patches two methods of vLLM's V1
model runner (the runner vLLM 0.32-0.33 uses on CPU, and that the abliserve engine forces on GPU):

* ``load_model``: after the weights are loaded, and so before ``torch.compile`` and CUDA-graph
  capture, a forward hook goes on every residual-stream writer, found on vLLM's module tree by
  the same rule as on transformers' (:mod:`abliserve.architectures`: embeddings, output
  projections, whole MoE blocks around ``FusedMoE``, post-norms where there are). Each hook
  calls the custom op of :mod:`abliserve.server.engines.vllm_op` on the writer's output,
  reading per-token strengths and bank slots from persistent buffers. The writer's own output
  is projected, never the residual stream: in Qwen2/Llama the ``down_proj`` output is fused
  with the residual add inside the next RMSNorm, and projecting the stream would compound
  (docs/MATHS.md). vLLM calls post-norm writers (Gemma 2/3) without a residual, so their
  output is exactly what is written.
* ``_prepare_inputs``: before every forward, the buffers are refilled from each request's
  ``SamplingParams.extra_args`` in ``input_batch.req_ids`` order
  (:mod:`abliserve.server.engines.vllm_routing`), where vLLM's LoRA sets its token mapping.

Nothing happens unless the engine's ``additional_config`` has an ``abliserve`` entry (built by
:func:`plugin_config`): plain vLLM in the same environment is untouched. That entry names the
direction files and a digest of their contents and of this plugin's code; vLLM hashes
``additional_config`` into its compile-cache key, so a changed bank or plugin never reuses a
graph traced without it (and plain vLLM never reuses one traced with it).

Pipeline parallelism is not supported (each stage would need its own site offsets); tensor
parallelism is: ``o_proj``/``down_proj``/the embedding all-reduce inside the module, so every
rank projects full-width rows with its own copy of the bank.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliserve.architectures import ArchitectureError, WriterSpec, writer_layout
from abliserve.bank import DirectionBank
from abliserve.directions.artifact import DirectionArtifact, load_artifact
from abliserve.server.engines import vllm_op
from abliserve.server.engines.direction_slots import DEFAULT_MAX_DIRECTIONS
from abliserve.server.engines.vllm_routing import TokenRouting, request_route

CONFIG_KEY = "abliserve"
TESTED_VLLM_VERSIONS = ((0, 32), (0, 33))  # major.minor releases this plugin is tested against
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
WRITE_SLOT_METHOD = "abliserve_write_slot"  # added to vLLM's workers, called by collective_rpc

logger = logging.getLogger("vllm.abliserve")  # a child of vLLM's logger, so it shows in its log
_registered = False


class PluginError(RuntimeError):
    """The plugin cannot install the ablation; raised in the vLLM process, stops the engine."""


def plugin_config(
    artifacts: dict[str, DirectionArtifact],
    cache_dir: Path,
    writers: WriterSpec | None = None,
    capacity: int = DEFAULT_MAX_DIRECTIONS,
) -> dict[str, Any]:
    """The ``additional_config`` entry that turns the plugin on for one engine: the start-up
    directions (slots 1, 2, ...) and the bank's ``capacity``, the slots allocated for
    directions loaded later.

    Each artifact is staged under ``cache_dir`` (:func:`stage_artifact`), so worker processes
    load exactly what the front end validated. Multi-node deployments need that folder on every
    node at the same path.
    """
    if len(artifacts) > capacity:
        raise PluginError(
            f"{len(artifacts)} directions given; the vLLM engine holds at most {capacity} "
            "(--max-directions)"
        )
    plugin_digest = hashlib.sha256()
    for module in (__file__, inspect.getfile(TokenRouting), vllm_op.__file__):
        plugin_digest.update(Path(module).read_bytes())
    entries = []
    for name, artifact in artifacts.items():
        path = stage_artifact(artifact, cache_dir)
        entries.append({"name": name, "path": str(path), "sha256": path.stem})
    config = {
        "directions": entries,
        "capacity": capacity,
        "plugin": plugin_digest.hexdigest()[:16],
    }
    if writers is not None:
        config["writers"] = str(writers)
    return {CONFIG_KEY: config}


def stage_artifact(artifact: DirectionArtifact, cache_dir: Path) -> Path:
    """Write ``artifact`` once under ``cache_dir``, named by its content, for the workers."""
    path = cache_dir / f"{_artifact_digest(artifact)}.safetensors"
    if not path.is_file():
        artifact.save(path)
    return path


def register() -> None:
    """Entry point: patch the V1 model runner once per process (vLLM may call this again)."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    _check_version(vllm.__version__)
    _check_hook_points(GPUModelRunner)
    runner_classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU-only build
        pass
    else:
        runner_classes.append(CPUModelRunner)
    for cls in runner_classes:
        if "load_model" in vars(cls):
            cls.load_model = _after_load(cls.load_model)
    # The GPU worker class, which the CPU worker subclasses. (Never import the CPU worker's
    # module here: importing it replaces torch.cuda's streams and events with no-ops.)
    setattr(Worker, WRITE_SLOT_METHOD, write_slot)
    GPUModelRunner._prepare_inputs = _before_prepare_inputs(GPUModelRunner._prepare_inputs)
    _refuse_v2_runner()
    _registered = True


def _check_version(version: str) -> None:
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if major_minor not in TESTED_VLLM_VERSIONS:
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED_VLLM_VERSIONS)
        logger.warning(
            "abliserve's vLLM plugin is tested with vLLM %s; this is vLLM %s", tested, version
        )


def _check_hook_points(runner_class: type) -> None:
    """Fail at start, naming the versions that work, if vLLM moved the methods we patch."""
    problems = []
    for method, parameter in (("_prepare_inputs", "num_scheduled_tokens"), ("load_model", None)):
        function = getattr(runner_class, method, None)
        if function is None:
            problems.append(f"{runner_class.__name__}.{method} is missing")
        elif parameter and parameter not in inspect.signature(function).parameters:
            problems.append(f"{runner_class.__name__}.{method} has no {parameter!r} parameter")
    if problems:
        tested = " or ".join(f"{a}.{b}" for a, b in TESTED_VLLM_VERSIONS)
        raise PluginError(
            f"abliserve's vLLM plugin cannot hook this vLLM ({'; '.join(problems)}). Install a "
            f"tested vLLM ({tested}), or set VLLM_PLUGINS to a list without 'abliserve' to run "
            "plain vLLM."
        )


def _refuse_v2_runner() -> None:
    """The V2 runner re-sorts the batch every step and has none of the hooks above: an engine
    configured for ablation on it must fail, never serve unablated tokens silently."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception:  # needs Triton; absent on CPU builds
        return
    original = V2Runner.load_model

    @functools.wraps(original)
    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        if CONFIG_KEY in (self.vllm_config.additional_config or {}):
            raise PluginError(
                f"abliserve needs vLLM's V1 model runner; set {V2_RUNNER_ENV}=0 "
                "(the abliserve vLLM engine does this itself)"
            )
        return original(self, *args, **kwargs)

    V2Runner.load_model = load_model


def _after_load(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_model(self, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        config = (self.vllm_config.additional_config or {}).get(CONFIG_KEY)
        if config is not None and getattr(self, "abliserve_routing", None) is None:
            self.abliserve_routing = install(self, config)
        return result

    return load_model


def _before_prepare_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: Any, *a, **kw) -> Any:
        routing: TokenRouting | None = getattr(self, "abliserve_routing", None)
        if routing is not None:
            routes = []
            for req_id in self.input_batch.req_ids:
                params = self.requests[req_id].sampling_params
                extra_args = params.extra_args if params is not None else None
                routes.append(request_route(extra_args, routing.num_slots))
            routing.fill(routes, num_scheduled_tokens)
        return original(self, scheduler_output, num_scheduled_tokens, *a, **kw)

    return _prepare_inputs


class SiteBank:
    """The bank as the hooks read it: one ``[1 + capacity, hidden]`` directions tensor and one
    ``[1 + capacity]`` weights tensor per site, allocated once; :meth:`write` fills a slot in
    place, so the addresses the hooks (and any compiled or captured graph) hold never change."""

    def __init__(self, bank: DirectionBank) -> None:
        sites = bank.directions.shape[1]
        self.directions = [bank.directions[:, site].contiguous() for site in range(sites)]
        self.weights = [bank.weights[:, site].contiguous() for site in range(sites)]

    @property
    def num_slots(self) -> int:
        return self.weights[0].shape[0]

    def write(self, slot: int, artifact: DirectionArtifact) -> None:
        if not 1 <= slot < self.num_slots:
            raise PluginError(f"bank slot {slot} is outside 1..{self.num_slots - 1}")
        # Inference mode: vLLM may have built the bank under it, and its tensors then accept
        # in-place writes only there (writes to ordinary tensors are allowed there too).
        pairs = zip(self.directions, self.weights, strict=True)
        with torch.inference_mode():
            for site, (directions, weights) in enumerate(pairs):
                directions[slot].copy_(artifact.directions[site])
                weights[slot].copy_(artifact.weights[site])


def install(runner: Any, config: dict[str, Any]) -> TokenRouting:
    """Load the bank and hook every writer of the runner's model; returns the routing buffers
    (the bank stays on the runner as ``abliserve_bank`` for :func:`write_slot`)."""
    if runner.parallel_config.pipeline_parallel_size > 1:
        raise PluginError("abliserve does not support pipeline parallelism; use tensor parallel")
    artifacts = {
        entry["name"]: _load_fitting(runner, entry["path"]) for entry in config["directions"]
    }
    spec = WriterSpec.parse(config["writers"]) if "writers" in config else None
    sites = writer_sites(runner.get_model(), spec)
    hidden_size = runner.model_config.hf_text_config.hidden_size
    capacity = int(config.get("capacity", len(artifacts)))
    bank = DirectionBank.from_artifacts(artifacts, len(sites), hidden_size, capacity)
    runner.abliserve_bank = SiteBank(bank.to(runner.device))
    routing = TokenRouting(runner.max_num_tokens, capacity + 1, runner.device)
    for site, modules in enumerate(sites):
        hook = _writer_hook(
            runner.abliserve_bank.directions[site], runner.abliserve_bank.weights[site], routing
        )
        for module in modules:
            module.register_forward_hook(hook)
    logger.info(
        "abliserve: ablation installed at %d writers, %d direction(s) %s of %d slots, "
        "%d-row buffers",
        sum(len(modules) for modules in sites),
        len(artifacts),
        list(artifacts),
        capacity,
        routing.max_tokens,
    )
    return routing


def write_slot(worker: Any, path: str, slot: int) -> None:
    """Worker method (``collective_rpc``): copy the staged artifact at ``path`` into bank slot
    ``slot`` in place. vLLM runs it between engine steps, so no forward sees half a write."""
    runner = worker.model_runner
    bank: SiteBank | None = getattr(runner, "abliserve_bank", None)
    if bank is None:
        raise PluginError("abliserve's ablation is not installed in this engine")
    bank.write(slot, _load_fitting(runner, path))


def _load_fitting(runner: Any, path: str) -> DirectionArtifact:
    """A staged artifact, checked against the model vLLM loaded (the front end checked the
    fingerprint; this catches a worker that loaded another model)."""
    text_config = runner.model_config.hf_text_config
    artifact = load_artifact(path)
    if (artifact.model.hidden_size, artifact.model.num_layers) != (
        text_config.hidden_size,
        text_config.num_hidden_layers,
    ):
        raise PluginError(
            f"direction {path} is for a model with hidden size {artifact.model.hidden_size} and "
            f"{artifact.model.num_layers} layers; vLLM loaded {runner.model_config.model} with "
            f"hidden size {text_config.hidden_size} and {text_config.num_hidden_layers} layers"
        )
    return artifact


def writer_sites(model: nn.Module, spec: WriterSpec | None = None) -> list[tuple[nn.Module, ...]]:
    """The residual-stream writers of a vLLM model, per canonical site."""
    try:
        sites = [site.modules for site in writer_layout(model, spec).sites]
    except ArchitectureError as error:
        raise PluginError(f"abliserve cannot ablate this model in vLLM: {error}") from None
    for writer in (module for modules in sites for module in modules):
        if getattr(writer, "skip_bias_add", False) and getattr(writer, "bias", None) is not None:
            raise PluginError(f"{type(writer).__name__} returns its bias separately: unsupported")
        if getattr(writer, "reduce_results", True) is False and writer.tp_size > 1:
            raise PluginError(f"{type(writer).__name__} does not all-reduce its output")
    return sites


def writer_modules(model: nn.Module) -> list[nn.Module]:
    """One writer per site (the first where a site has several), for checks and tests."""
    return [modules[0] for modules in writer_sites(model)]


def _writer_hook(
    site_directions: torch.Tensor, site_weights: torch.Tensor, routing: TokenRouting
) -> Callable[..., Any]:
    # The registered operator, not the ``custom_op`` wrapper object: the same op for tracing and
    # graphs, without the wrapper's Python layer (~30 us per call, 49 calls per step here).
    op = torch.ops.abliserve.ablate_tokens

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        # vLLM's linear layers return (output, output_bias); output_bias is None here (checked).
        if isinstance(output, tuple):
            ablated = op(output[0], site_directions, site_weights, routing.slots, routing.strengths)
            return (ablated, *output[1:])
        return op(output, site_directions, site_weights, routing.slots, routing.strengths)

    return hook


def _artifact_digest(artifact: DirectionArtifact) -> str:
    digest = hashlib.sha256()
    digest.update(artifact.directions.to(torch.float32).contiguous().numpy().tobytes())
    digest.update(artifact.weights.to(torch.float32).contiguous().numpy().tobytes())
    digest.update(repr(sorted(artifact.metadata().items())).encode())
    return digest.hexdigest()


def force_v1_runner() -> None:
    """Select vLLM's V1 model runner in this process and the ones it starts (loudly)."""
    if os.environ.get(V2_RUNNER_ENV, "0").lower() in ("1", "true"):
        raise PluginError(f"{V2_RUNNER_ENV}=1 is set; abliserve needs the V1 runner (unset it)")
    os.environ[V2_RUNNER_ENV] = "0"
