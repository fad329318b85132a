"""``abliserve directions optimize``: argument parsing and validation (the search itself is
:mod:`abliserve.optimize.study`, imported lazily so ``--help`` stays instant)."""

from __future__ import annotations

import argparse
from pathlib import Path

from abliserve.directions.cli import add_prompt_file_arguments, prompt_files
from abliserve.directions.errors import DirectionError

ESTIMATOR_NAMES = ("mean", "median", "variance-scaled")


def register(directions: argparse._SubParsersAction) -> None:
    optimize = directions.add_parser(
        "optimize",
        help="search estimators and ablation shapes for the best refusals/KL trade-off",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Multi-objective search (Optuna TPE, seeded) over how the refusal direction is "
            "estimated (difference of means, of medians, or variance-scaled; optionally made "
            "orthogonal to the top principal components of harmless activations; optionally "
            "from the prompts the model refuses/answers only) and how it is applied (one "
            "direction at a fractional layer index or each layer's own, a tent-shaped weight "
            "kernel for attention and for MLP writers, the embedding's weight). Objectives, "
            "both minimised: the refusal rate on harmful validation prompts (greedy, "
            "JailbreakBench markers) and the mean first-token KL(baseline || ablated) on "
            "harmless validation prompts. Every trial runs through one engine: each round "
            "loads --batch candidate directions at run time and measures them side by side. "
            "Validation prompts: harmful_train beyond --train-count plus harmful_val, and the "
            "first --kl-count of harmless_val; JailbreakBench is never used (it is the test "
            "set). The study is kept in --study (a journal file): rerunning continues up to "
            "--trials. At the end the Pareto front is printed and written to --out: one "
            "artifact per point (parameters and validation scores in its metadata), "
            "pareto.json and pareto.png."
        ),
    )
    optimize.add_argument(
        "--model", required=True, help="'demo', a local checkpoint folder, or a cached id"
    )
    optimize.add_argument(
        "--study", required=True, type=Path, help="Optuna journal file (created or resumed)"
    )
    optimize.add_argument(
        "--out", required=True, type=Path, help="folder for the Pareto artifacts and report"
    )
    optimize.add_argument("--trials", type=int, default=40, help="completed trials to reach")
    optimize.add_argument(
        "--batch", type=int, default=4, help="candidates loaded and measured side by side"
    )
    optimize.add_argument(
        "--engine", default="auto", help="auto (vLLM if installed), vllm or transformers"
    )
    optimize.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    optimize.add_argument(
        "--startup-trials", type=int, default=10, help="random trials before TPE takes over"
    )
    optimize.add_argument(
        "--warm-start",
        action="append",
        default=[],
        type=Path,
        metavar="ARTIFACT",
        help="measure this earlier optimize artifact's parameters first (repeatable): a new "
        "study starts from points already known to be good; needs the same model",
    )
    add_prompt_file_arguments(optimize)
    optimize.add_argument(
        "--train-count", type=int, default=192, help="extraction prompts per class"
    )
    optimize.add_argument(
        "--kl-count", type=int, default=64, help="harmless validation prompts (KL)"
    )
    optimize.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens generated per harmful prompt"
    )
    optimize.add_argument(
        "--estimators",
        default=",".join(ESTIMATOR_NAMES),
        help=f"comma-separated estimators to search among ({', '.join(ESTIMATOR_NAMES)})",
    )
    optimize.add_argument(
        "--max-rank", type=int, default=16, help="largest harmless-subspace rank (0: never)"
    )
    optimize.add_argument("--dtype", default="auto", help="engine dtype (auto, float32, ...)")
    optimize.add_argument(
        "--max-num-seqs", type=int, default=64, help="engine rows decoded together"
    )
    optimize.add_argument("--batch-size", type=int, default=16, help="extraction batch size")
    optimize.add_argument(
        "--activations-cache",
        type=Path,
        help="extraction activations file; default: next to --study, .activations.pt",
    )
    optimize.set_defaults(handler=_optimize)


def _optimize(args: argparse.Namespace) -> int:
    from abliserve.directions.estimators import Estimator
    from abliserve.optimize.study import OptimizeOptions, optimize
    from abliserve.server.engines import resolve_engine_kind

    counts = {
        "--trials": args.trials,
        "--batch": args.batch,
        "--train-count": args.train_count,
        "--kl-count": args.kl_count,
        "--max-new-tokens": args.max_new_tokens,
        "--max-num-seqs": args.max_num_seqs,
        "--batch-size": args.batch_size,
    }
    for flag, value in counts.items():
        if value < 1:
            raise DirectionError(f"{flag} must be at least 1, got {value}")
    if args.startup_trials < 0 or args.max_rank < 0:
        raise DirectionError("--startup-trials and --max-rank must not be negative")
    names = [name.strip() for name in args.estimators.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ESTIMATOR_NAMES))
    if unknown or not names:
        raise DirectionError(
            f"--estimators takes {', '.join(ESTIMATOR_NAMES)}; got {args.estimators!r}"
        )
    if args.out.exists() and not args.out.is_dir():
        raise DirectionError(f"--out {args.out} exists and is not a folder")
    optimize(
        OptimizeOptions(
            model=args.model,
            study=args.study,
            out=args.out,
            trials=args.trials,
            batch=args.batch,
            engine=resolve_engine_kind(args.engine),
            seed=args.seed,
            startup_trials=args.startup_trials,
            warm_start=tuple(args.warm_start),
            prompt_files=prompt_files(args),
            train_count=args.train_count,
            kl_count=args.kl_count,
            max_new_tokens=args.max_new_tokens,
            estimators=tuple(Estimator(name) for name in dict.fromkeys(names)),
            max_rank=args.max_rank,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            batch_size=args.batch_size,
            activations_cache=args.activations_cache,
        )
    )
    return 0
