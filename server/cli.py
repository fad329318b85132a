"""``abliserve serve``: vLLM-style flags, validated before the model loads.

Everything a user can get wrong (a missing model, a direction for another model, a bad range or
key file) is reported as one ``abliserve: error:`` line before uvicorn starts.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from abliserve.errors import UserError

DEMO_DIRECTION_NAME = "refusal"


def demo_direction_path() -> Path:
    """The committed direction for the demo model (shipped inside the package)."""
    from importlib.resources import files

    return Path(str(files("abliserve") / "data/directions/qwen2.5-coder-0.5b-instruct.safetensors"))


def register(commands: argparse._SubParsersAction) -> None:
    from abliserve.architectures import add_writers_flag
    from abliserve.server.engines import ENGINE_CHOICES
    from abliserve.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_REQUESTS

    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API with per-request ablation",
        description=(
            "Start an OpenAI-compatible HTTP server. Each request may choose an ablation "
            "strength and direction with the headers X-Ablation-Strength / X-Ablation-Direction "
            "or the body field ablation: {strength, direction}; responses report what was "
            "applied in X-Ablation-Applied and an 'ablation' field."
        ),
    )
    serve.add_argument("--model", help="'demo', a local checkpoint folder, or a cached hub id")
    serve.add_argument(
        "--direction",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a direction artifact to load (repeatable); NAME defaults to the file's stem; "
        "the first is the default direction",
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve the bundled demo model with its committed direction (named 'refusal')",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="auto",
        help="auto = vLLM where installed, else transformers (default: auto)",
    )
    serve.add_argument(
        "--default-strength",
        type=float,
        default=0.0,
        help="strength for requests that do not choose one (default 0: baseline)",
    )
    serve.add_argument(
        "--strength-range",
        default="0,1",
        metavar="MIN,MAX",
        help="strengths requests may ask for (default 0,1)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept this bearer key with full ablation rights (repeatable)",
    )
    serve.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="PATH",
        help='JSON or TOML: {"keys": {"<key>": {"allow_ablation": bool, "max_strength": float}}}',
    )
    serve.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = float32 on CPU, bfloat16 on GPU",
    )
    serve.add_argument(
        "--max-num-seqs",
        type=int,
        default=32,
        help="most requests decoded together in one batch (default 32)",
    )
    serve.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="the name(s) clients use in 'model' (default: the model's id)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        metavar="N",
        help="generation requests in flight (running or queued) before new ones get 429 "
        f"(default {DEFAULT_MAX_CONCURRENT_REQUESTS})",
    )
    serve.add_argument(
        "--metrics-require-key",
        action="store_true",
        help="/metrics answers only with a valid API key (default: open, like /health)",
    )
    serve.add_argument(
        "--health-require-key",
        action="store_true",
        help="/health answers only with a valid API key (default: open, for load balancers)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, let in-flight requests finish this long, then cancel them "
        "(default 30)",
    )
    vllm = serve.add_argument_group("vLLM engine", "passed through to vLLM (--engine vllm)")
    vllm.add_argument("--tensor-parallel-size", type=int, help="GPUs (CPU: processes) per replica")
    vllm.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="fraction of GPU memory vLLM may use (CPU: host RAM; see VLLM_CPU_KVCACHE_SPACE)",
    )
    vllm.add_argument(
        "--enforce-eager", action="store_true", default=None, help="no torch.compile/CUDA graphs"
    )
    vllm.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached prompt prefixes (default on; ablated requests are salted apart)",
    )
    add_writers_flag(serve)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(handler=serve_command)


def parse_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--strength-range must be MIN,MAX (two numbers), got {text!r}") from None
    return low, high


def parse_direction(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).stem, Path(spec)
    if not name or not path:
        raise UserError(f"--direction must be NAME=PATH or PATH, got {spec!r}")
    return name, Path(path)


def vllm_options(args: argparse.Namespace, engine: str) -> dict:
    """The vLLM-only flags the user gave (the others keep vLLM's defaults)."""
    names = ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.enable_prefix_caching is not None:
        options["enable_prefix_caching"] = args.enable_prefix_caching
    if options and engine != "vllm":
        flags = ", ".join("--" + name.replace("_", "-") for name in options)
        raise UserError(f"{flags} only apply to the vLLM engine (--engine vllm)")
    return options


def build_config(args: argparse.Namespace):
    """Resolve and validate every flag into a :class:`ServerConfig` (no model loaded yet)."""
    from abliserve.architectures import check_checkpoint
    from abliserve.directions.artifact import load_artifact
    from abliserve.models import checkpoint_identity, resolve_model
    from abliserve.server.app import ServerConfig
    from abliserve.server.engines import EngineOptions, resolve_engine_kind
    from abliserve.server.limits import RequestLimits
    from abliserve.server.policy import ServerPolicy, load_keys

    model = args.model or ("demo" if args.demo else None)
    if model is None:
        raise UserError("serve needs --model (or --demo)")
    specs = [parse_direction(s) for s in args.direction]
    if args.demo and not specs:
        specs = [(DEMO_DIRECTION_NAME, demo_direction_path())]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--direction names must be unique, got {names}")
    if args.max_num_seqs < 1:
        raise UserError("--max-num-seqs must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError("--max-model-len must be at least 2")
    for flag, value in (
        ("--max-body-bytes", args.max_body_bytes),
        ("--max-concurrent-requests", args.max_concurrent_requests),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    engine = resolve_engine_kind(args.engine)
    checkpoint = resolve_model(model)
    identity = checkpoint_identity(checkpoint)  # a corrupt checkpoint: one clear error first
    check_checkpoint(checkpoint, args.writers)  # unknown architectures need --writers
    directions = {}
    for name, path in specs:
        artifact = load_artifact(path)
        artifact.check_fits(identity, artifact_name=f"direction {name!r} ({path})")
        directions[name] = artifact
    return ServerConfig(
        checkpoint=checkpoint,
        identity=identity,
        directions=directions,
        served_model_names=args.served_model_name or [identity.model_id],
        policy=ServerPolicy(
            directions=tuple(names),
            default_strength=args.default_strength,
            strength_range=parse_range(args.strength_range),
        ),
        keys=load_keys(args.api_key, args.api_keys_file),
        engine=engine,
        engine_options=EngineOptions(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            writers=args.writers,
            vllm=vllm_options(args, engine),
        ),
        limits=RequestLimits(
            max_body_bytes=args.max_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
        ),
        metrics_require_key=args.metrics_require_key,
        health_require_key=args.health_require_key,
    )


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_command(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from abliserve.server.app import create_app

    config = build_config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # After a graceful shutdown uvicorn re-raises the signal that asked for it, under the handler
    # it found at start-up; make that handler a clean exit 0, which is what supervisors expect.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_after_shutdown)
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    return 0
