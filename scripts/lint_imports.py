"""Check the import layers (``[tool.importlinter]`` in pyproject.toml) with ``lint-imports``.

abliserve's subpackages live in their own top-level folders (``server/`` is
``abliserve.server``, see ``package-dir``), which import-linter cannot see from the
``abliserve/`` folder alone. This assembles the installed layout from symbolic links in a
temporary folder and runs ``lint-imports`` over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def assemble(layout: Path) -> None:
    """Link each mapped folder at its package's path; a package with subpackages mapped
    elsewhere becomes a real folder of links to its entries, so nothing links into the repo."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    for name in sorted(folders, key=lambda n: n.count(".")):
        target = layout / name.replace(".", "/")
        source = ROOT / folders[name]
        if any(other.startswith(f"{name}.") for other in folders):
            target.mkdir(parents=True)
            for entry in source.iterdir():
                entry_target = target / entry.name
                if not entry_target.exists():
                    entry_target.symlink_to(entry)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        layout = Path(folder)
        assemble(layout)
        environment = {**os.environ, "PYTHONPATH": str(layout)}
        command = [str(Path(sys.executable).parent / "lint-imports")]
        command.append(str(ROOT / "pyproject.toml"))
        return subprocess.run(command, cwd=layout, env=environment).returncode


if __name__ == "__main__":
    sys.exit(main())
