#!/usr/bin/env bash
# The whole test suite: lint, fast unit tests, then real-model, vLLM and browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python scripts/lint_imports.py   # import layers: [tool.importlinter] in pyproject.toml
.venv/bin/python -m abliserve.cli demo-model >/dev/null   # provision/convert once, outside timings
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
