"""The wheel holds every tracked module: built from the tracked files alone (as a Docker image or
a release would be), it must contain each ``.py`` under the folders ``pyproject.toml`` maps to
import packages. An editable install imports from the source tree and would never notice a
subpackage missing from the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]


def tracked_files() -> list[str]:
    listing = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return listing.stdout.splitlines()


def expected_modules(tracked: list[str]) -> set[str]:
    """Each tracked module's path in the wheel: ``server/app.py`` is ``abliserve/server/app.py``."""
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    expected = set()
    for name, folder in folders.items():
        prefix = name.replace(".", "/")
        for path in tracked:
            if path.startswith(f"{folder}/") and path.endswith(".py"):
                expected.add(f"{prefix}/{path[len(folder) + 1 :]}")
    return expected


def test_wheel_contains_every_tracked_module(tmp_path: Path) -> None:
    tracked = tracked_files()
    source = tmp_path / "source"
    for path in tracked:
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*PIP_WHEEL, "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("abliserve-*.whl")
    contents = set(zipfile.ZipFile(wheel).namelist())
    missing = expected_modules(tracked) - contents
    assert not missing, f"tracked modules missing from the wheel: {sorted(missing)}"
    assert "abliserve/server/engines/vllm_engine.py" in contents
