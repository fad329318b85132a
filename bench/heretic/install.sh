#!/usr/bin/env bash
# Installs the reference abliteration tool (heretic-llm, from PyPI) into its own virtual
# environment, bench/heretic/.venv: its pins (transformers, peft, optuna, ...) differ from
# abliserve's, so the two must not share one environment.
#
# torch is installed first and pinned to the CPU build this machine carries, so that heretic's
# torch requirement is already satisfied and pip does not fetch a multi-gigabyte CUDA wheel.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv"
HERETIC_VERSION="${HERETIC_VERSION:-}"   # empty: the newest release on PyPI

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "heretic-llm${HERETIC_VERSION:+==$HERETIC_VERSION}"
"$VENV/bin/python" -m pip show heretic-llm | sed -n 's/^Version: /heretic-llm /p'
