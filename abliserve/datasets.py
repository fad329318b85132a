"""Instruction sets shipped with the package, and loading of user-supplied ones.

The defaults (``abliserve/data/prompts``) are the refusal_direction splits: AdvBench,
MaliciousInstruct and TDC2023 (harmful train), HarmBench (harmful validation) and Stanford Alpaca
(harmless). Alpaca is CC BY-NC 4.0: fine for research use; pass your own files for anything else.
"""

from __future__ import annotations

import csv
import hashlib
import json
from importlib import resources
from pathlib import Path

from abliserve.errors import UserError


class DatasetError(UserError, ValueError):
    """A prompt file that is missing, empty or malformed."""


PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


def default_path(name: str) -> Path:
    if name not in PROMPT_SETS:
        raise DatasetError(f"unknown default prompt set {name!r}; choose from {PROMPT_SETS}")
    return Path(str(resources.files("abliserve") / "data" / "prompts" / f"{name}.json"))


def load_instructions(path: str | Path, column: str | None = None) -> list[str]:
    """Read instructions from JSON (a list of strings or of ``{"instruction": ...}``), JSONL,
    CSV (``column``, else ``Goal``/``prompt``/``instruction``) or plain text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            items = [_instruction(row, path) for row in json.loads(text)]
        elif suffix == ".jsonl":
            items = [_instruction(json.loads(line), path) for line in text.splitlines() if line]
        elif suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            fields = rows[0].keys() if rows else []
            key = column or next(
                (c for c in ("Goal", "prompt", "instruction") if c in fields), None
            )
            if key is None or key not in fields:
                raise DatasetError(
                    f"prompt file {path} has no column {column or 'Goal/prompt/instruction'}"
                )
            items = [row[key] for row in rows]
        else:
            items = [line for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError) as error:
        raise DatasetError(f"prompt file {path} is malformed: {error}") from None
    items = [item.strip() for item in items if item and item.strip()]
    if not items:
        raise DatasetError(f"prompt file {path} holds no instructions")
    return items


def _instruction(row: object, path: Path) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("instruction"), str):
        return row["instruction"]
    raise DatasetError(f"prompt file {path}: entry {row!r:.80} is not a string or instruction")


def instructions_hash(instructions: list[str]) -> str:
    """A stable hash of a prompt list, recorded in artifacts so results can be reproduced."""
    return hashlib.sha256(json.dumps(instructions).encode()).hexdigest()
