#!/usr/bin/env bash
# Screen refusal-direction variants for the demo model over HTTP (results in
# directions/RESULTS.md). Every step is a product command:
#   1. `abliserve directions compute` builds one artifact per variant (layer, prompt filtering,
#      projection, per-layer directions, weight kernel) from one cached extraction run,
#   2. one `abliserve serve --engine vllm` loads them all as named directions,
#   3. `abliserve eval` screens each variant on validation prompts: harmful_train[192:] plus
#      harmful_val (107 prompts, none used for extraction; JailbreakBench stays the test set)
#      and first-token KL on 64 harmless_val prompts.
# The baseline (strength 0) is the same for every variant: it is generated once and seeded into
# each variant's results folder, which `abliserve eval` then resumes.
#   directions/search.sh [WORK_DIR]        # default /tmp/abliserve-search; ~30 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/abliserve-search}"
PORT="${ABLISERVE_PORT:-8765}"
STRENGTHS="${SEARCH_STRENGTHS:-1}"
BIN=.venv/bin
mkdir -p "$WORK/artifacts" "$WORK/eval"

# name | compute flags (all share --train-count 192, so one activation cache serves them).
# SEARCH_VARIANTS (one "name|flags" per line) replaces the list; an artifact already present as
# WORK/artifacts/NAME.safetensors is used as it is (e.g. a copy of the committed one).
DEFAULT_VARIANTS=(
    "f14|--layer 14 --filter-prompts"
    "f13|--layer 13 --filter-prompts"
    "f15|--layer 15 --filter-prompts"
    "f12|--layer 12 --filter-prompts"
    "u14|--layer 14"
    "f14proj|--layer 14 --filter-prompts --projected"
    "f14k8|--layer 14 --filter-prompts --width 8 --min-weight 0.2"
    "f14k12|--layer 14 --filter-prompts --width 12 --min-weight 0.2"
    "f14from6|--layer 14 --filter-prompts --first-layer 6"
    "f14from10|--layer 14 --filter-prompts --first-layer 10"
    "f14pl|--layer 14 --filter-prompts --per-layer"
    "f14plk8|--layer 14 --filter-prompts --per-layer --width 8 --min-weight 0.2"
    "f13k12|--layer 13 --filter-prompts --width 12 --min-weight 0.2"
    "f15k12|--layer 15 --filter-prompts --width 12 --min-weight 0.2"
)
if [[ -n "${SEARCH_VARIANTS:-}" ]]; then
    mapfile -t VARIANTS <<< "$SEARCH_VARIANTS"
else
    VARIANTS=("${DEFAULT_VARIANTS[@]}")
fi

directions=()
for variant in "${VARIANTS[@]}"; do
    name="${variant%%|*}" flags="${variant#*|}"
    out="$WORK/artifacts/$name.safetensors"
    if [[ ! -f "$out" ]]; then
        # shellcheck disable=SC2086
        "$BIN/abliserve" directions compute --model demo --out "$out" $flags \
            --train-count 192 --val-count 8 --activations-cache "$WORK/activations.pt" \
            > "$WORK/artifacts/$name.log" 2>&1
    fi
    directions+=(--direction "$name=$out")
done

"$BIN/python" - "$WORK" <<'PY'
import json, sys
from abliserve.datasets import default_path, load_instructions

work = sys.argv[1]
harmful = load_instructions(default_path("harmful_train"))[192:] + load_instructions(
    default_path("harmful_val")
)
harmless = load_instructions(default_path("harmless_val"))[:64]
json.dump(harmful, open(f"{work}/screen_harmful.json", "w"), indent=1)
json.dump(harmless, open(f"{work}/screen_harmless.json", "w"), indent=1)
print(f"screening on {len(harmful)} harmful and {len(harmless)} harmless prompts")
PY

source scripts/measure_server.sh
start_measure_server "$WORK/server.log" "$PORT" --strength-range 0,2 "${directions[@]}"

evaluate() {  # $1 = variant name
    "$BIN/abliserve" eval --server "http://127.0.0.1:$PORT" --direction "$1" \
        --harmful "$WORK/screen_harmful.json" --kl-harmless "$WORK/screen_harmless.json" \
        --strengths "$STRENGTHS" --max-tokens 64 --concurrency 32 --out "$WORK/eval/$1"
}

# The shared baseline (strength 0) rows: from WORK/baseline.jsonl if a previous search left
# one there, else from the first variant's run. Each variant's eval resumes from them.
for variant in "${VARIANTS[@]}"; do
    name="${variant%%|*}"
    mkdir -p "$WORK/eval/$name"
    if [[ -f "$WORK/baseline.jsonl" && ! -f "$WORK/eval/$name/results.jsonl" ]]; then
        cp "$WORK/baseline.jsonl" "$WORK/eval/$name/results.jsonl"
    fi
    evaluate "$name" > "$WORK/eval/$name.log"
    [[ -f "$WORK/baseline.jsonl" ]] ||
        grep '"key": "[a-z]*/[0-9]*/0.0"' "$WORK/eval/$name/results.jsonl" > "$WORK/baseline.jsonl"
done

"$BIN/python" - "$WORK" "${VARIANTS[@]}" <<'PY'
import json, sys

work, variants = sys.argv[1], sys.argv[2:]
print(f"{'variant':<12} {'alpha':>5} {'refused (JBB markers)':>22} {'refused (heretic)':>18} {'KL':>7}")
for variant in variants:
    name, flags = variant.split("|", 1)
    rows = json.load(open(f"{work}/eval/{name}/summary.json"))["strengths"]
    for row in rows:
        print(
            f"{name:<12} {row['strength']:>5g} {row['harmful_refusal_jailbreakbench']:>22.1%} "
            f"{row['harmful_refusal_heretic']:>18.1%} {row['kl_mean']:>7.3f}   {flags}"
        )
PY
