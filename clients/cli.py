"""Sub-commands that talk to a running server: ``ab`` (side-by-side comparison) and ``eval``
(refusal rates and KL over datasets, across strengths). Both are HTTP clients only, so they work
against any abliserve deployment. The handlers import the ``openai`` client lazily (it takes a
second to import), so ``abliserve --help`` stays instant."""

from __future__ import annotations

import argparse
import json
import os

from abliserve.clients import DEFAULT_SERVER

DEFAULT_STRENGTHS = "0,0.25,0.5,0.75,1"


def register(commands: argparse._SubParsersAction) -> None:
    ab = commands.add_parser(
        "ab",
        help="compare baseline vs ablated outputs of a running server, side by side",
        description=(
            "Send a prompt to a running abliserve server once at baseline and once per "
            "--strength (same seed, run concurrently) and print the outputs side by side with "
            "refusal markers highlighted (red: JailbreakBench list, yellow: heretic list)."
        ),
    )
    _add_server_arguments(ab)
    ab.add_argument("prompt", nargs="?", help="the user prompt (or use --file)")
    ab.add_argument(
        "--file", help="prompts, one per line (or JSON / JSONL / CSV with a Goal/prompt column)"
    )
    ab.add_argument(
        "--strength",
        action="append",
        metavar="ALPHA",
        help="strength of the ablated column; repeat for more columns (default 1)",
    )
    ab.add_argument("--direction", help="direction name (default: the server's default)")
    ab.add_argument("--system", help="system prompt")
    ab.add_argument("--max-tokens", type=int, default=128)
    ab.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ab.add_argument("--seed", type=int, default=0, help="the same seed for every column")
    ab.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ab.set_defaults(handler=_ab)

    evaluate = commands.add_parser(
        "eval",
        help="refusal rates and first-token KL of a running server across strengths",
        description=(
            "Run harmful and harmless prompt sets through a running abliserve server at each "
            "strength (greedy): refusal rate on harmful prompts, over-refusal on harmless ones, "
            "and first-token KL(baseline || ablated) on harmless prompts. Writes results.jsonl "
            "(resumable: rerun the same command to finish an interrupted run), summary.json, "
            "summary.csv and sweep.png to --out."
        ),
    )
    _add_server_arguments(evaluate)
    evaluate.add_argument(
        "--harmful", required=True, help="harmful prompts (e.g. bench/data/jbb_harmful.csv)"
    )
    evaluate.add_argument(
        "--harmless",
        help="harmless prompts for over-refusal (XSTest CSV: only its 'safe' rows are used)",
    )
    evaluate.add_argument(
        "--kl-harmless",
        help="harmless prompts for first-token KL (default: --harmless; neither: no KL)",
    )
    evaluate.add_argument(
        "--strengths",
        default=DEFAULT_STRENGTHS,
        help=f"comma-separated strengths (default {DEFAULT_STRENGTHS}; 0 is always run)",
    )
    evaluate.add_argument("--direction", help="direction name (default: the server's default)")
    evaluate.add_argument("--max-tokens", type=int, default=64)
    evaluate.add_argument("--limit", type=int, help="use only the first N prompts of each set")
    evaluate.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight (the server batches them)"
    )
    evaluate.add_argument(
        "--out", default="eval-results", help="output folder (default %(default)s)"
    )
    evaluate.set_defaults(handler=_eval)


def register_server_directions(directions: argparse._SubParsersAction) -> None:
    """``abliserve directions list|upload|delete``: the directions of a running server."""
    listing = directions.add_parser(
        "list",
        help="list the directions a running server has loaded",
        description="Print the directions a running abliserve server has loaded (GET "
        "/v1/directions): name, bank slot, requests in flight using it, layers, and whether it "
        "is the default.",
    )
    _add_server_arguments(listing)
    listing.add_argument("--json", action="store_true", help="print the server's JSON as is")
    listing.set_defaults(handler=_list_directions)
    upload = directions.add_parser(
        "upload",
        help="load a direction artifact into a running server (admin key)",
        description="Upload a direction artifact (.safetensors, from 'abliserve directions "
        "compute') to a running server under NAME (POST /v1/directions). The server checks it "
        "as at start-up (the model's weights fingerprint, shapes, finite unit rows) and copies "
        "it into a free slot of its direction bank without a restart; requests may name it at "
        'once. Needs an API key marked "admin": true in the server\'s --api-keys-file.',
    )
    upload.add_argument("name", help="the name requests will use (letters, digits, . _ -)")
    upload.add_argument("artifact", help="the direction artifact file (.safetensors)")
    _add_server_arguments(upload)
    upload.set_defaults(handler=_upload_direction)
    delete = directions.add_parser(
        "delete",
        help="remove a direction from a running server (admin key)",
        description="Remove a direction from a running server (DELETE /v1/directions/NAME). "
        "New requests naming it are refused at once; requests already running with it finish "
        "with it, and its bank slot is reused only after them. The server's default direction "
        "cannot be removed.",
    )
    delete.add_argument("name", help="the direction to remove")
    _add_server_arguments(delete)
    delete.set_defaults(handler=_delete_direction)


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("ABLISERVE_SERVER", DEFAULT_SERVER),
        help=f"server URL (default $ABLISERVE_SERVER or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("ABLISERVE_API_KEY"),
        help="API key (default $ABLISERVE_API_KEY)",
    )


def _list_directions(args: argparse.Namespace) -> int:
    from abliserve.clients.client import AbliserveClient

    with AbliserveClient(args.server, args.api_key) as client:
        directions = client.directions()
    for direction in directions:
        if args.json:
            print(json.dumps({"name": direction.name, **direction.details}))
            continue
        details = direction.details
        default = " (default)" if details.get("default") else ""
        print(
            f"{direction.name}{default}: slot {details.get('slot')}, "
            f"{details.get('in_flight', 0)} in flight, layers {details.get('layers')}"
        )
    return 0


def _upload_direction(args: argparse.Namespace) -> int:
    from abliserve.clients.client import AbliserveClient

    with AbliserveClient(args.server, args.api_key) as client:
        direction = client.upload_direction(args.name, args.artifact)
    print(f"loaded {direction.name} into slot {direction.details.get('slot')}")
    return 0


def _delete_direction(args: argparse.Namespace) -> int:
    from abliserve.clients.client import AbliserveClient

    with AbliserveClient(args.server, args.api_key) as client:
        in_flight = client.delete_direction(args.name)
    print(
        f"removed {args.name}" + (f" ({in_flight} request(s) finish with it)" if in_flight else "")
    )
    return 0


def _ab(args: argparse.Namespace) -> int:
    from abliserve.clients import ab_cli

    return ab_cli.run(args)


def _eval(args: argparse.Namespace) -> int:
    from abliserve.clients import evaluate

    return evaluate.run(args)
