"""``abliserve serve``: vLLM-style flags, validated before the model loads.

Everything a user can get wrong (a missing model, a direction for another model, a bad range or
key file) is reported as one ``abliserve: error:`` line before uvicorn starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import socket
from pathlib import Path

from abliserve.errors import UserError

DEMO_DIRECTION_NAME = "refusal"
UVICORN_STARTUP_FAILURE = 3  # what uvicorn.run exits with when the app fails to start


def demo_direction_path() -> Path:
    """The committed direction for the demo model (shipped inside the package)."""
    from importlib.resources import files

    return Path(str(files("abliserve") / "data/directions/qwen2.5-coder-0.5b-instruct.safetensors"))


def register(commands: argparse._SubParsersAction) -> None:
    from abliserve.architectures import add_writers_flag
    from abliserve.server.engines import ENGINE_CHOICES
    from abliserve.server.engines.direction_slots import DEFAULT_MAX_DIRECTIONS
    from abliserve.server.limits import (
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_CONCURRENT_REQUESTS,
        DEFAULT_MAX_UPLOAD_BYTES,
    )

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
        help="auto = vLLM where it is installed and can start on this machine, else transformers "
        "(one warning line says why; default: auto)",
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
        help='JSON or TOML: {"keys": {"<key>": {"allow_ablation": bool, "max_strength": float, '
        '"directions": [names], "admin": bool}}}; an admin key may load and remove directions '
        "while the server runs (POST/DELETE /v1/directions)",
    )
    serve.add_argument(
        "--max-directions",
        type=int,
        default=DEFAULT_MAX_DIRECTIONS,
        metavar="N",
        help="direction bank slots, for --direction and directions loaded at run time "
        f"(default {DEFAULT_MAX_DIRECTIONS}; 0 on the vLLM engine: plain vLLM, no ablation)",
    )
    serve.add_argument(
        "--max-direction-bytes",
        type=int,
        default=DEFAULT_MAX_UPLOAD_BYTES,
        metavar="N",
        help="largest direction upload accepted by POST /v1/directions "
        f"(default {DEFAULT_MAX_UPLOAD_BYTES})",
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
    add_exposure_flags(serve)
    vllm = serve.add_argument_group("vLLM engine", "passed through to vLLM (--engine vllm)")
    vllm.add_argument("--tensor-parallel-size", type=int, help="GPUs (CPU: processes) per replica")
    vllm.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="fraction of GPU memory vLLM may use (CPU: host RAM; see VLLM_CPU_KVCACHE_SPACE)",
    )
    vllm.add_argument(
        "--kv-cache-memory-bytes",
        type=parse_bytes,
        metavar="BYTES",
        help="KV cache size, e.g. 2G (CPU default: sized from the NUMA node's available memory "
        "after the weights, and the context fitted to it; the start-up log says what was chosen)",
    )
    vllm.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no torch.compile/CUDA graphs (default on CPU: eager, the engine starts in seconds "
        "instead of minutes; --no-enforce-eager compiles)",
    )
    vllm.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse cached prompt prefixes (default on; ablated requests are salted apart)",
    )
    vllm.add_argument(
        "--tool-call-parser",
        metavar="NAME",
        help="as vllm serve --enable-auto-tool-choice --tool-call-parser NAME: tool_choice "
        '"auto" parses the model\'s tool calls (hermes for Qwen2.5); without it "auto" is a 400',
    )
    add_writers_flag(serve)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--verbose",
        action="store_true",
        help="show the engine's own start-up output and full tracebacks when it cannot start",
    )
    serve.set_defaults(handler=serve_command)


def add_exposure_flags(serve: argparse.ArgumentParser) -> None:
    """Who may reach the server from where, and how long a body may take (SECURITY.md)."""
    from abliserve.server.limits import DEFAULT_BODY_TIMEOUT_S

    exposure = serve.add_argument_group("exposure", "hosts, browser origins, slow clients")
    exposure.add_argument(
        "--allowed-hosts",
        type=comma_list,
        default=[],
        metavar="HOST[,HOST...]",
        help="Host header names accepted besides localhost and the bind address ('*': any; "
        "default with a wildcard --host: any)",
    )
    exposure.add_argument(
        "--allowed-origins",
        type=comma_list,
        default=[],
        metavar="ORIGIN[,ORIGIN...]",
        help="browser origins allowed to call the API cross-site (CORS), e.g. "
        "https://app.example.com (default: none)",
    )
    exposure.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        metavar="SECONDS",
        help=f"request bodies slower than this get 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def check_exposure_flags(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise UserError(f"--body-timeout must be a positive number, got {args.body_timeout}")
    for origin in args.allowed_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UserError(f"--allowed-origins entries must start with http(s)://, got {origin!r}")


def parse_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--strength-range must be MIN,MAX (two numbers), got {text!r}") from None
    return low, high


BYTE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``2G``, ``512M``, ``1073741824`` (binary multiples, like vLLM's memory flags)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 2G or 512M, got {text!r}")
    return int(float(match.group(1)) * BYTE_SUFFIXES[match.group(2).upper()])


def parse_direction(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).stem, Path(spec)
    if not name or not path:
        raise UserError(f"--direction must be NAME=PATH or PATH, got {spec!r}")
    return name, Path(path)


def vllm_options(args: argparse.Namespace, engine: str) -> dict:
    """The vLLM-only flags the user gave (the others keep vLLM's defaults)."""
    names = (
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "enforce_eager",
    )
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.enable_prefix_caching is not None:
        options["enable_prefix_caching"] = args.enable_prefix_caching
    given = [*options, *(["tool_call_parser"] if args.tool_call_parser else [])]
    if given and engine != "vllm":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags} only apply to the vLLM engine (--engine vllm)")
    if args.tool_call_parser:
        check_tool_call_parser(args.tool_call_parser)
    return options


def check_tool_call_parser(name: str) -> None:
    """A name vLLM knows, checked before any model loads (vLLM would fail at start-up)."""
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        raise UserError(f"--tool-call-parser {name!r} is not one of vLLM's: {', '.join(known)}")


def build_config(args: argparse.Namespace):
    """Resolve and validate every flag into a :class:`ServerConfig` (no model loaded yet)."""
    from abliserve.architectures import check_checkpoint
    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.identity import checkpoint_identity
    from abliserve.models import resolve_model
    from abliserve.server.app import ServerConfig
    from abliserve.server.engines import EngineOptions, resolve_engine_kind
    from abliserve.server.engines.direction_slots import check_direction_name
    from abliserve.server.guard import allowed_hosts
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
    for name in names:
        check_direction_name(name)
    if args.max_directions < 0:
        raise UserError(f"--max-directions must be at least 0, got {args.max_directions}")
    if len(names) > args.max_directions:
        raise UserError(
            f"{len(names)} --direction(s) given but --max-directions is {args.max_directions}"
        )
    if args.max_num_seqs < 1:
        raise UserError("--max-num-seqs must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError("--max-model-len must be at least 2")
    for flag, value in (
        ("--max-body-bytes", args.max_body_bytes),
        ("--max-concurrent-requests", args.max_concurrent_requests),
        ("--max-direction-bytes", args.max_direction_bytes),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    check_exposure_flags(args)
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
            peaks={name: float(a.weights.max()) for name, a in directions.items()},
        ),
        keys=load_keys(args.api_key, args.api_keys_file),
        engine=args.engine,  # unresolved: `auto` may still fall back when vLLM cannot start
        engine_options=EngineOptions(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            writers=args.writers,
            max_directions=args.max_directions,
            vllm=vllm_options(args, engine),
        ),
        limits=RequestLimits(
            max_body_bytes=args.max_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
            body_timeout_s=args.body_timeout,
            max_upload_bytes=args.max_direction_bytes,
        ),
        metrics_require_key=args.metrics_require_key,
        health_require_key=args.health_require_key,
        verbose=args.verbose,
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        allowed_origins=args.allowed_origins,
        tool_call_parser=args.tool_call_parser,
    )


def _exit_after_shutdown(signum: int, frame: object) -> None:
    raise SystemExit(0)


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engine starts: a port already taken fails in a
    second instead of after the model has loaded, and vLLM's own start-up (which opens
    ephemeral ports of its own) can never take ours in the meantime."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the engine dies (exit
    :data:`~abliserve.server.watchdog.ENGINE_DIED_EXIT_CODE`, for a supervisor to restart); an
    engine that cannot start is one ``abliserve: error:`` line (exit 2)."""
    import uvicorn

    from abliserve.server.app import create_app
    from abliserve.server.watchdog import ENGINE_DIED_EXIT_CODE

    config = build_config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # After a graceful shutdown uvicorn re-raises the signal that asked for it, under the handler
    # it found at start-up; make that handler a clean exit 0, which is what supervisors expect.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_after_shutdown)
    listener = bind_listener(args.host, args.port)
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    if not args.verbose:
        # An engine that cannot start is one `abliserve: error:` line (raised below), not
        # uvicorn's "startup failed" traceback.
        logging.getLogger("uvicorn.error").addFilter(lambda record: app.state.startup_error is None)
    try:
        server.run(sockets=[listener])
    except SystemExit:  # uvicorn's exit 3 after a failed start; ours is the one line below
        if app.state.startup_error is None:
            raise
    if app.state.startup_error is not None:
        raise app.state.startup_error
    if app.state.engine_death is not None:
        return ENGINE_DIED_EXIT_CODE
    return 0 if server.started else UVICORN_STARTUP_FAILURE
