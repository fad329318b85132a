"""``abliserve ab``: one prompt (or a file of them) at baseline and ablated, side by side.

The terminal view is a table with one column per variant, refusal markers highlighted (red: the
JailbreakBench list the reference numbers use; yellow: heretic's broader list). ``--json`` prints
the server's A/B response, one JSON object per line, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from abliserve.clients.client import AbliserveClient
from abliserve.datasets import load_instructions
from abliserve.errors import UserError
from abliserve.refusal import MarkerList
from abliserve.server.ab_protocol import ABResponse, ABVariant

MARKER_STYLES = {MarkerList.JAILBREAKBENCH.value: "bold red", MarkerList.HERETIC.value: "yellow"}
PARALLEL_PROMPTS = 4  # prompts of a --file in flight at once; the server batches them


def parse_strength(text: str) -> float:
    """A strength from the command line, or a one-line :class:`UserError`."""
    try:
        return float(text)
    except ValueError:
        raise UserError(f"strength must be a number, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    prompts = _prompts(args)
    strengths = [parse_strength(text) for text in args.strength or ["1"]]
    console = Console(soft_wrap=False)
    with AbliserveClient(args.server, args.api_key) as client:

        def compare(prompt: str) -> ABResponse:
            return client.ab(
                prompt,
                strengths=strengths,
                direction=args.direction,
                system=args.system,
                max_tokens=args.max_tokens,
                seed=args.seed,
                temperature=args.temperature,
            )

        with ThreadPoolExecutor(PARALLEL_PROMPTS) as pool:
            for prompt, result in zip(prompts, pool.map(compare, prompts), strict=True):
                if args.json:
                    sys.stdout.write(result.model_dump_json() + "\n")
                    sys.stdout.flush()
                else:
                    console.print(render(prompt, result))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.file is None):
        raise UserError("give either a prompt or --file FILE (one prompt per line, or JSON/CSV)")
    if args.file is not None:
        return load_instructions(Path(args.file))
    if not args.prompt.strip():
        raise UserError("the prompt is empty")
    return [args.prompt]


def render(prompt: str, result: ABResponse) -> Table:
    """A table with the prompt as title and one column per variant."""
    table = Table(title=Text(prompt, style="bold"), show_lines=True, expand=True)
    for variant in result.variants:
        table.add_column(_header(variant), ratio=1, overflow="fold")
    table.add_row(*(highlighted(variant) for variant in result.variants))
    return table


def _header(variant: ABVariant) -> Text:
    header = Text(variant.label, style="bold")
    if variant.ablation.direction and variant.ablation.strength:
        header.append(f" ({variant.ablation.direction})")
    refused = [name for name, flags in variant.refusal.items() if flags.refused]
    header.append("\n")
    if refused:
        header.append(f"REFUSED ({', '.join(refused)})", style="bold red")
    else:
        header.append("complied", style="green")
    header.append(
        f"\n{variant.completion_tokens} tokens, {variant.latency_s:.1f} s, {variant.finish_reason}",
        style="dim",
    )
    return header


def highlighted(variant: ABVariant) -> Text:
    """The variant's text with every matched refusal marker styled."""
    if not variant.text.strip():
        return Text("(empty output)", style="bold red")
    text = Text(variant.text)
    # heretic first so the (stricter) JailbreakBench style wins where both match
    for name in (MarkerList.HERETIC.value, MarkerList.JAILBREAKBENCH.value):
        flags = variant.refusal.get(name)
        if flags is not None:
            markers = [marker for marker in flags.markers if marker]
            text.highlight_words(
                markers,
                MARKER_STYLES[name],
                case_sensitive=name == MarkerList.JAILBREAKBENCH.value,
            )
    return text
