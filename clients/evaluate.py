"""``abliserve eval``: refusal rates and damage of a running server across ablation strengths.

Per strength α (docs/EVAL.md): the refusal rate on harmful prompts under both marker lists (empty
outputs count as refusals and are also counted apart), the over-refusal rate on harmless prompts,
and the mean first-token KL(baseline ‖ α) on harmless prompts. Generations are greedy with the
same seed at every strength, so only the ablation differs.

Every finished request is appended to ``results.jsonl`` at once, keyed by what it measured; a
rerun with the same ``--out`` skips the keys already there, so an interrupted run (Ctrl-C, a
crash, a server restart) loses at most the requests in flight.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from abliserve.clients.ab_cli import parse_strength
from abliserve.clients.client import AbliserveClient
from abliserve.datasets import DatasetError, instructions_hash, load_instructions
from abliserve.errors import UserError
from abliserve.refusal import MarkerList, is_refusal

GREEDY = {"temperature": 0.0, "seed": 0}
RESULTS = "results.jsonl"


@dataclass(frozen=True)
class PromptSets:
    harmful: list[str]
    harmless: list[str]  # over-refusal
    kl: list[str]  # first-token KL


@dataclass(frozen=True)
class Task:
    """One request: a greedy generation (set "harmful"/"harmless") or the first-token KL of one
    harmless prompt (set "kl") at one strength."""

    set: str
    index: int
    strength: float

    @property
    def key(self) -> str:
        return f"{self.set}/{self.index}/{self.strength!r}"


@dataclass(frozen=True)
class StrengthSummary:
    strength: float
    harmful_n: int
    harmful_refusal_jailbreakbench: float
    harmful_refusal_heretic: float
    harmful_empty: int
    harmless_n: int
    harmless_refusal_jailbreakbench: float
    harmless_refusal_heretic: float
    harmless_empty: int
    kl_n: int
    kl_mean: float
    kl_median: float


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts of ``path``; for an XSTest-style CSV (a ``label`` column) only the ``safe`` rows,
    since its unsafe rows are contrast prompts a model should refuse."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and "label" in rows[0] and "prompt" in rows[0]:
            safe = [row["prompt"].strip() for row in rows if row["label"] == "safe"]
            if not safe:
                raise DatasetError(f"prompt file {path} has no rows labelled 'safe'")
            return safe
    return load_instructions(path)


def parse_strengths(text: str) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``, always including the baseline 0, sorted, unique."""
    strengths = {parse_strength(part) for part in text.split(",") if part.strip()}
    if any(not math.isfinite(strength) for strength in strengths):
        raise UserError(f"strengths must be finite numbers, got {text!r}")
    return sorted(strengths | {0.0})


def plan(sets: PromptSets, strengths: list[float]) -> list[Task]:
    """Every request of the run, prompt by prompt (all strengths and sets of prompt i before
    prompt i + 1), so an interrupted run already holds complete rows for its first prompts:
    ``--limit N`` then summarises them without waiting for the rest."""
    ablated = [strength for strength in strengths if strength != 0]  # KL at 0 is 0 by definition
    longest = max(len(sets.harmful), len(sets.harmless), len(sets.kl))
    return [
        Task(name, index, strength)
        for index in range(longest)
        for name, prompts, levels in (
            ("harmful", sets.harmful, strengths),
            ("harmless", sets.harmless, strengths),
            ("kl", sets.kl, ablated),
        )
        if index < len(prompts)
        for strength in levels
    ]


class ResultStore:
    """``results.jsonl`` in the output folder: one JSON line per finished task, flushed at once.

    ``run.json`` pins what makes results comparable (server model, direction, max tokens, prompt
    hashes); reusing a folder for a different run is refused rather than mixed.
    """

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / RESULTS
        identity_path = folder / "run.json"
        if identity_path.is_file():
            previous = json.loads(identity_path.read_text())
            changed = sorted(
                k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k)
            )
            if changed:
                raise UserError(
                    f"{folder} holds results of a different run ({', '.join(changed)} differ); "
                    "use another --out"
                )
        else:
            identity_path.write_text(json.dumps(identity, indent=2) + "\n")
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: redo that task
                self.records[record["key"]] = record
        self._handle = self.path.open("a", encoding="utf-8")
        if self._handle.tell() and not self.path.read_bytes().endswith(b"\n"):
            self._handle.write("\n")  # end the cut-short line so the next record starts clean

    def add(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def execute(
    tasks: Iterable[Task],
    work: Callable[[Task], dict[str, Any]],
    store: ResultStore,
    concurrency: int,
) -> None:
    """Run the tasks not in ``store`` with ``concurrency`` requests in flight, recording each as
    it finishes. The first failure (e.g. the server rejects the direction) stops the run."""
    pending = [task for task in tasks if task.key not in store.records]
    queue = iter(pending)
    with (
        ThreadPoolExecutor(concurrency) as pool,
        tqdm(total=len(pending), desc="eval", unit="req") as bar,
    ):
        running: dict[Future, Task] = {}
        try:
            while True:
                for task in queue:
                    running[pool.submit(work, task)] = task
                    if len(running) >= concurrency:
                        break
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    store.add({"key": task.key, **future.result()})
                    bar.update()
        finally:
            for future in running:
                future.cancel()


def make_worker(
    client: AbliserveClient,
    sets: PromptSets,
    direction: str | None,
    max_tokens: int,
) -> Callable[[Task], dict[str, Any]]:
    def work(task: Task) -> dict[str, Any]:
        if task.set == "kl":
            result = client.first_token(
                sets.kl[task.index], strengths=[task.strength], direction=direction
            )
            return {"kl": result.variants[1].kl_from_baseline}
        prompt = getattr(sets, task.set)[task.index]
        reply = client.chat(
            prompt,
            strength=task.strength,
            direction=direction,
            max_tokens=max_tokens,
            **GREEDY,
        )
        text = reply.choices[0].message.content or ""
        return {
            "text": text,
            "finish_reason": reply.choices[0].finish_reason,
            "completion_tokens": reply.usage.completion_tokens if reply.usage else None,
        }

    return work


def summarise(
    store: ResultStore, sets: PromptSets, strengths: list[float]
) -> list[StrengthSummary]:
    records = store.records
    summaries = []
    for strength in strengths:
        harmful = [
            records[Task("harmful", i, strength).key]["text"] for i in range(len(sets.harmful))
        ]
        harmless = [
            records[Task("harmless", i, strength).key]["text"] for i in range(len(sets.harmless))
        ]
        kls = [
            0.0 if strength == 0 else records[Task("kl", i, strength).key]["kl"]
            for i in range(len(sets.kl))
        ]
        summaries.append(
            StrengthSummary(
                strength=strength,
                harmful_n=len(harmful),
                harmful_refusal_jailbreakbench=_rate(harmful, MarkerList.JAILBREAKBENCH),
                harmful_refusal_heretic=_rate(harmful, MarkerList.HERETIC),
                harmful_empty=sum(not text.strip() for text in harmful),
                harmless_n=len(harmless),
                harmless_refusal_jailbreakbench=_rate(harmless, MarkerList.JAILBREAKBENCH),
                harmless_refusal_heretic=_rate(harmless, MarkerList.HERETIC),
                harmless_empty=sum(not text.strip() for text in harmless),
                kl_n=len(kls),
                kl_mean=statistics.fmean(kls) if kls else math.nan,
                kl_median=statistics.median(kls) if kls else math.nan,
            )
        )
    return summaries


def _rate(texts: list[str], markers: MarkerList) -> float:
    return sum(is_refusal(text, markers) for text in texts) / len(texts) if texts else math.nan


def table(summaries: list[StrengthSummary], title: str) -> Table:
    view = Table(title=title)
    for column in (
        "α",
        "harmful refused\n(JBB)",
        "harmful refused\n(heretic)",
        "harmful\nempty",
        "harmless refused\n(JBB)",
        "harmless refused\n(heretic)",
        "first-token KL\nmean",
        "KL\nmedian",
    ):
        view.add_column(column, justify="right")
    for row in summaries:
        view.add_row(
            f"{row.strength:g}",
            _percent(row.harmful_refusal_jailbreakbench),
            _percent(row.harmful_refusal_heretic),
            str(row.harmful_empty),
            _percent(row.harmless_refusal_jailbreakbench),
            _percent(row.harmless_refusal_heretic),
            _number(row.kl_mean),
            _number(row.kl_median),
        )
    return view


def direction_identity(client: AbliserveClient, name: str | None) -> dict[str, Any]:
    """The direction the run ablates (``name``, else the server's default) as the server
    describes it, so results of a replaced artifact with the same name are not mixed in."""
    cards = client.directions()
    card = next((c for c in cards if (c.name == name if name else c.details.get("default"))), None)
    if card is None:
        if name is None:
            return {"name": None}
        raise UserError(
            f"unknown direction {name!r}; the server has {[c.name for c in cards] or 'none'}"
        )
    return {"name": card.name, **{k: v for k, v in card.details.items() if k != "default"}}


def _percent(rate: float) -> str:
    return "–" if math.isnan(rate) else f"{rate:.0%}"


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def write_summary(folder: Path, summaries: list[StrengthSummary], run: dict[str, Any]) -> None:
    rows = [asdict(summary) for summary in summaries]
    (folder / "summary.json").write_text(
        json.dumps({"run": run, "strengths": rows}, indent=2) + "\n"
    )
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    from abliserve.clients.plots import plot_sweep

    strengths = parse_strengths(args.strengths)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {args.concurrency}")
    kl_file = args.kl_harmless or args.harmless
    full = PromptSets(
        harmful=load_prompt_file(args.harmful),
        harmless=load_prompt_file(args.harmless) if args.harmless else [],
        kl=load_prompt_file(kl_file) if kl_file else [],
    )
    # Hash the full sets and key tasks by index, so a rerun with a larger --limit resumes.
    limit = slice(args.limit)
    sets = PromptSets(full.harmful[limit], full.harmless[limit], full.kl[limit])
    folder = Path(args.out)
    with AbliserveClient(args.server, args.api_key) as client:
        direction = args.direction
        run_info = {
            "model": client.model,
            "direction": direction_identity(client, direction),
            "max_tokens": args.max_tokens,
            "harmful_sha256": instructions_hash(full.harmful),
            "harmless_sha256": instructions_hash(full.harmless),
            "kl_sha256": instructions_hash(full.kl),
        }
        store = ResultStore(folder, run_info)
        try:
            work = make_worker(client, sets, direction, args.max_tokens)
            execute(plan(sets, strengths), work, store, args.concurrency)
        finally:
            store.close()
    summaries = summarise(store, sets, strengths)
    run_info = {**run_info, "server": client.base_url, "strengths": strengths, "limit": args.limit}
    write_summary(folder, summaries, run_info)
    plot_sweep(summaries, folder / "sweep.png", title=f"{run_info['model']}: strength sweep")
    Console().print(table(summaries, f"abliserve eval: {run_info['model']}"))
    print(f"results in {folder}/ (summary.json, summary.csv, sweep.png, {RESULTS})")
    return 0
