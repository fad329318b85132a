"""Sub-commands ``abliserve directions compute|inspect|evaluate`` and ``abliserve export``.

Handlers import torch and transformers lazily so that ``abliserve --help`` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from abliserve.architectures import add_writers_flag
from abliserve.datasets import PROMPT_SETS
from abliserve.directions.errors import DirectionError


def register(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``directions`` and ``export``; returns the ``directions`` actions, which the layers
    above extend: the clients with the actions on a running server (upload, list, delete),
    ``optimize`` with the search that needs the engines."""
    directions = commands.add_parser(
        "directions",
        help="compute, inspect and evaluate refusal directions; load them into a running server",
        description="Compute, inspect and evaluate refusal directions offline, and list, "
        "upload and delete the directions of a running server.",
    )
    sub = directions.add_subparsers(dest="directions_command", required=True, metavar="ACTION")
    _register_compute(sub)
    _register_inspect(sub)
    _register_evaluate(sub)
    _register_export(commands)
    return sub


def _layer_list(text: str) -> list[int]:
    """``8-18`` or ``8,10,12`` (or a mix) -> a list of layers."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = part.split("-")
                layers += range(int(low), int(high) + 1)
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layers like 8-18 or 8,10,12, got {text!r}"
        ) from None
    return layers


def _register_compute(sub: argparse._SubParsersAction) -> None:
    compute = sub.add_parser(
        "compute",
        help="compute a refusal direction from harmful/harmless prompts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Run the model over harmful and harmless instructions, take the per-layer "
            "difference of means of the residual stream at the last prompt token, score each "
            "candidate layer on validation prompts (refusal log-odds with ablation; first-token "
            "KL on harmless prompts, rejected above --kl-bound; adding the direction must induce "
            "refusal) and write the best one as an artifact, with a per-layer table and a PNG "
            "plot. Per-layer directions: --per-layer makes every writer use the direction of the "
            "residual it writes into (heretic-style); --width W weights writers by a linear "
            "kernel peaked (weight 1) at the chosen layer, falling to --min-weight at W layers "
            "and 0 beyond."
        ),
    )
    compute.add_argument(
        "--model",
        required=True,
        help="'demo', a local checkpoint folder, or a cached Hugging Face id",
    )
    compute.add_argument("--out", required=True, type=Path, help="artifact file (.safetensors)")
    compute.add_argument(
        "--report", type=Path, help="per-layer plot (PNG); default: next to --out, .layers.png"
    )
    add_prompt_file_arguments(compute)
    compute.add_argument(
        "--train-count", type=int, default=128, help="extraction prompts per class"
    )
    compute.add_argument(
        "--val-count", type=int, default=32, help="validation prompts per class (selection)"
    )
    compute.add_argument("--layer", type=int, help="use this layer instead of choosing")
    compute.add_argument(
        "--candidate-layers",
        type=_layer_list,
        metavar="LAYERS",
        help="layers to score, e.g. 8-18; default: 1 up to the last 20%%",
    )
    compute.add_argument(
        "--kl-bound",
        type=float,
        default=0.1,
        help="reject candidates whose harmless first-token KL exceeds this",
    )
    compute.add_argument(
        "--projected",
        action="store_true",
        help="projected abliteration: remove the harmless-mean component first",
    )
    compute.add_argument(
        "--filter-prompts",
        action="store_true",
        help="average only harmful prompts the model refuses and harmless ones "
        "it answers (first-token refusal score)",
    )
    compute.add_argument(
        "--per-layer", action="store_true", help="each writer uses its own layer's direction"
    )
    compute.add_argument("--width", type=float, help="weight kernel half-width in layers")
    compute.add_argument(
        "--min-weight",
        type=float,
        default=0.0,
        help="kernel weight at --width layers from the peak",
    )
    compute.add_argument(
        "--first-layer",
        type=int,
        default=0,
        help="leave writers of earlier layers (and the embedding, if > 0) alone",
    )
    compute.add_argument(
        "--refusal-tokens",
        default="I,As",
        help="comma-separated words whose first token opens a refusal",
    )
    compute.add_argument("--batch-size", type=int, default=16)
    compute.add_argument(
        "--activations-cache", type=Path, help="reuse/store extraction activations in this file"
    )
    add_writers_flag(compute)
    compute.set_defaults(handler=_compute)


def _compute(args: argparse.Namespace) -> int:
    from abliserve.directions.compute import ComputeOptions, compute
    from abliserve.directions.select import SiteProfile

    if args.width is not None and args.width <= 0:
        raise DirectionError(f"--width must be positive, got {args.width}")
    if min(args.train_count, args.val_count, args.batch_size) < 1:
        raise DirectionError("--train-count, --val-count and --batch-size must be at least 1")
    words = tuple(w.strip() for w in args.refusal_tokens.split(",") if w.strip())
    if not words:
        raise DirectionError("--refusal-tokens names no token")
    compute(
        ComputeOptions(
            model=args.model,
            out=args.out,
            report=args.report,
            prompt_files=prompt_files(args),
            train_count=args.train_count,
            val_count=args.val_count,
            layer=args.layer,
            candidate_layers=args.candidate_layers,
            kl_bound=args.kl_bound,
            projected=args.projected,
            filter_prompts=args.filter_prompts,
            profile=SiteProfile(
                per_layer=args.per_layer,
                width=args.width,
                min_weight=args.min_weight,
                first_layer=args.first_layer,
            ),
            refusal_words=words,
            batch_size=args.batch_size,
            activations_cache=args.activations_cache,
            writers=args.writers,
        )
    )
    return 0


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="print what a direction artifact holds")
    inspect.add_argument("artifact", type=Path)
    inspect.add_argument("--model", help="also check the artifact fits this model")
    inspect.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    import json

    from abliserve.directions.artifact import load_artifact

    artifact = load_artifact(args.artifact)
    meta = artifact.metadata()
    active = int((artifact.weights != 0).sum())
    print(f"artifact:  {args.artifact}")
    print(f"fits:      {artifact.model.describe()}")
    print(f"sites:     {artifact.num_sites} ({active} with non-zero weight)")
    print(f"weights:   {[round(w, 3) for w in artifact.weights.tolist()]}")
    print(f"method:    {json.dumps(meta['method'], sort_keys=True)}")
    print(f"datasets:  {json.dumps(meta['datasets'], sort_keys=True)}")
    scores = {k: v for k, v in meta["scores"].items() if k != "candidates"}
    print(f"scores:    {json.dumps(scores, sort_keys=True)}")
    if args.model:
        from abliserve.directions.identity import checkpoint_identity
        from abliserve.models import resolve_model

        artifact.check_fits(checkpoint_identity(resolve_model(args.model)), str(args.artifact))
        print(f"check:     fits {args.model}")
    return 0


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="measure refusal rate and KL of directions at given strengths",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Greedy-generate answers to harmful prompts (batched, through the ablation hooks) at "
            "strength 0 (baseline) and each --strengths value, count refusals with the "
            "JailbreakBench markers (heretic's list as a second opinion; empty = refusal) and "
            "measure first-token KL(baseline || ablated) on harmless prompts."
        ),
    )
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument(
        "--direction",
        required=True,
        action="append",
        type=Path,
        help="direction artifact (repeat to compare several)",
    )
    evaluate.add_argument("--strengths", type=float, nargs="+", default=[1.0])
    evaluate.add_argument(
        "--harmful",
        default="bench/data/jbb_harmful.csv",
        help="harmful prompts (CSV 'Goal' column, JSON, text)",
    )
    evaluate.add_argument("--harmless", default="bench/data/harmless_test.json")
    evaluate.add_argument("--harmful-count", type=int, default=100)
    evaluate.add_argument("--harmless-count", type=int, default=100)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--batch-size", type=int, default=25)
    evaluate.add_argument("--json", type=Path, help="also write numbers and completions here")
    add_writers_flag(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    import json
    import math
    import sys
    from dataclasses import asdict

    from abliserve.datasets import load_instructions
    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.evaluate import Evaluator
    from abliserve.directions.identity import checkpoint_identity
    from abliserve.directions.modelio import load_model
    from abliserve.models import resolve_model

    if not all(math.isfinite(s) for s in args.strengths):
        raise DirectionError(f"--strengths must be finite numbers, got {args.strengths}")
    if min(args.harmful_count, args.harmless_count, args.max_new_tokens, args.batch_size) < 1:
        raise DirectionError("counts, --max-new-tokens and --batch-size must be at least 1")
    checkpoint = resolve_model(args.model)
    identity = checkpoint_identity(checkpoint)
    artifacts = {}
    for path in args.direction:
        artifact = load_artifact(path)
        artifact.check_fits(identity, str(path))
        artifacts[path.stem] = artifact
    harmful = load_instructions(args.harmful)[: args.harmful_count]
    harmless = load_instructions(args.harmless)[: args.harmless_count]

    model, tokenizer = load_model(checkpoint, writers=args.writers)
    evaluator = Evaluator(
        model, tokenizer, harmful, harmless, args.batch_size, args.max_new_tokens, args.writers
    )
    first = next(iter(artifacts))  # strength 0 is the same model whichever direction
    plan = [(artifacts[first], "baseline", 0.0)]
    plan += [(a, name, s) for name, a in artifacts.items() for s in args.strengths if s != 0]
    conditions = []
    for artifact, name, strength in plan:
        condition = evaluator.run(artifact, name, strength)
        conditions.append(condition)
        print(
            f"{name} @ {strength:g}: refusals {condition.refusal_rate:.0%} (heretic "
            f"{condition.refusal_rate_heretic:.0%}), KL {condition.kl:.4f}",
            file=sys.stderr,
        )
        if args.json:  # after every condition: a long run that dies keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "model": identity.model_id,
                "harmful": args.harmful,
                "harmless": args.harmless,
                "max_new_tokens": args.max_new_tokens,
                "conditions": [asdict(c) for c in conditions],
            }
            args.json.write_text(json.dumps(record, indent=1))
    _print_conditions(conditions, len(harmful), len(harmless))
    return 0


def _print_conditions(conditions: list, harmful_count: int, harmless_count: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"refusals on {harmful_count} harmful prompts; first-token KL on "
        f"{harmless_count} harmless prompts"
    )
    for column in ("direction", "strength", "refusals (JBB)", "refusals (heretic)", "KL"):
        table.add_column(column, justify="right")
    for c in conditions:
        table.add_row(
            c.direction,
            f"{c.strength:g}",
            f"{c.refusal_rate:.0%}",
            f"{c.refusal_rate_heretic:.0%}",
            f"{c.kl:.4f}",
        )
    Console().print(table)


def _register_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write the ablation as an orthogonalised checkpoint or a LoRA adapter",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Bake directional ablation at --strength into the weights: W <- (I - a w r r^T) W "
            "for the embedding and every o_proj/down_proj (biases too). A tied lm_head is "
            "untied. The result is a plain safetensors checkpoint with config and tokenizer "
            "that loads in transformers and vLLM like any other. --format lora writes the same "
            "update as a rank-1 PEFT LoRA adapter per writer (exact; lora_alpha = strength), "
            "for engines with per-request LoRA; --format lora-gguf writes it as one llama.cpp "
            "LoRA GGUF file. Models with biases on the writers or norms after them are refused."
        ),
    )
    export.add_argument("--model", required=True)
    export.add_argument("--direction", required=True, type=Path)
    export.add_argument("--strength", type=float, default=1.0)
    export.add_argument(
        "--out", required=True, type=Path, help="new checkpoint or adapter folder, or .gguf file"
    )
    export.add_argument(
        "--format", choices=("checkpoint", "lora", "lora-gguf"), default="checkpoint"
    )
    export.add_argument(
        "--embedding",
        dest="include_embedding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lora formats: adapt the embedding writer; --no-embedding leaves it out, for "
        "engines that cannot load an embedding LoRA (e.g. vLLM 0.32 on Qwen2), and is then "
        "not exact if the direction weights the embedding",
    )
    add_writers_flag(export)
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    import math
    import sys

    from abliserve.directions.artifact import load_artifact
    from abliserve.directions.export import export_checkpoint
    from abliserve.directions.lora import export_lora
    from abliserve.models import resolve_model

    if not math.isfinite(args.strength):
        raise DirectionError(f"--strength must be a finite number, got {args.strength}")
    if args.out.exists():
        raise DirectionError(f"--out {args.out} already exists; choose a new name")
    if args.format == "checkpoint" and not args.include_embedding:
        raise DirectionError("--no-embedding applies to the lora formats only")
    artifact = load_artifact(args.direction)
    checkpoint = resolve_model(args.model)
    name = str(args.direction)
    if args.format == "checkpoint":
        export_checkpoint(checkpoint, artifact, args.strength, args.out, name, args.writers)
    else:
        if args.writers:
            raise DirectionError(
                "--writers applies to --format checkpoint; adapters are exported for the "
                "architectures whose writers a LoRA can express"
            )
        gguf = args.format == "lora-gguf"
        adapter = export_lora(
            checkpoint, artifact, args.strength, args.out, name, args.include_embedding, gguf
        )
        if adapter.omitted_embedding_weight:
            print(
                f"abliserve: warning: left out the embedding writer (site weight "
                f"{adapter.omitted_embedding_weight:g}); the adapter is not the exact ablation",
                file=sys.stderr,
            )
    print(args.out)
    return 0


def add_prompt_file_arguments(parser: argparse.ArgumentParser) -> None:
    """--harmful-train, --harmless-train, --harmful-val, --harmless-val: the four prompt sets
    that ``compute`` and ``optimize`` both read, each defaulting to the packaged file."""
    for name in PROMPT_SETS:
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="FILE",
            help=f"instructions (JSON/JSONL/CSV/text); default: package {name}",
        )


def prompt_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The prompt-set files given on the command line (None: the packaged default)."""
    return {name: getattr(args, name) for name in PROMPT_SETS}
