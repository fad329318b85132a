"""Write the head-to-head prompt sets as local datasets heretic can read offline.

heretic reads a prompt set either from a text file (one prompt per line, which would split the
package prompts that contain newlines) or from a local folder that ``datasets.load_dataset``
reads; this writes one such folder per set (``NAME/train.jsonl``, column ``text``), already
sliced, so heretic's config names split ``train`` and column ``text`` for all four:

    good / bad      harmless_train[:192] / harmful_train[:192]   (direction extraction)
    good_eval       harmless_val[:64]                            (first-token KL)
    bad_eval        harmful_train[192:] + harmful_val            (refusal count, 107 prompts)

Run with abliserve's interpreter: ``.venv/bin/python bench/heretic/prompts.py OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from abliserve.datasets import default_path, load_instructions


def prompt_sets() -> dict[str, list[str]]:
    """The four prompt sets of the head-to-head protocol (bench/RESULTS.md)."""
    harmful_train = load_instructions(default_path("harmful_train"))
    return {
        "good": load_instructions(default_path("harmless_train"))[:192],
        "bad": harmful_train[:192],
        "good_eval": load_instructions(default_path("harmless_val"))[:64],
        "bad_eval": harmful_train[192:] + load_instructions(default_path("harmful_val")),
    }


def main(out_dir: str) -> None:
    for name, prompts in prompt_sets().items():
        folder = Path(out_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.jsonl", "w", encoding="utf-8") as file:
            for prompt in prompts:
                file.write(json.dumps({"text": prompt}) + "\n")
        print(f"{name}: {len(prompts)} prompts -> {folder}")


if __name__ == "__main__":
    main(sys.argv[1])
