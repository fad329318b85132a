#!/usr/bin/env bash
# Evaluate Pareto fronts of direction artifacts on the test set in ONE abliserve vLLM server:
# every artifact of every front folder is loaded as a named direction, and `abliserve eval`
# screens each at strength 1 on all 100 JailbreakBench behaviours (greedy, 64 new tokens, both
# marker lists) with first-token KL on bench/data/harmless_test.json[:100]. The baseline
# (strength 0) is generated once and seeded into every direction's folder, which `abliserve
# eval` then resumes (as directions/search.sh does). Results in bench/RESULTS.md.
#   bench/heretic/evaluate_fronts.sh WORK_DIR FRONT_DIR...
# e.g. bench/heretic/evaluate_fronts.sh /tmp/h2h-eval /work/h2h/heretic-front /work/h2h/abliserve-front
# Directions already evaluated (WORK/eval/NAME/summary.json) are skipped, so a second front can
# be added by rerunning with both folders. Ends with bench/heretic/plot_fronts.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="$1"
shift
PORT="${ABLISERVE_PORT:-8766}"
BIN=.venv/bin
mkdir -p "$WORK/eval"

directions=() names=()
for front in "$@"; do
    for artifact in "$front"/*.safetensors; do
        name="$(basename "$artifact" .safetensors)"
        [[ " ${names[*]} " == *" $name "* ]] && { echo "duplicate direction name $name" >&2; exit 2; }
        names+=("$name")
        directions+=(--direction "$name=$artifact")
    done
done
echo "${#names[@]} directions: ${names[*]}"

VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" "$BIN/abliserve" serve --model demo \
    --engine vllm --dtype float32 --max-model-len 1024 \
    --port "$PORT" "${directions[@]}" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { tail -20 "$WORK/server.log"; exit 1; }
    sleep 2
done

for name in "${names[@]}"; do
    out="$WORK/eval/$name"
    [[ -f "$out/summary.json" ]] && continue
    mkdir -p "$out"
    if [[ -f "$WORK/baseline.jsonl" && ! -f "$out/results.jsonl" ]]; then
        cp "$WORK/baseline.jsonl" "$out/results.jsonl"
    fi
    start=$(date +%s)
    "$BIN/abliserve" eval --server "http://127.0.0.1:$PORT" --direction "$name" \
        --harmful bench/data/jbb_harmful.csv --kl-harmless bench/data/harmless_test.json \
        --limit 100 --strengths 1 --max-tokens 64 --concurrency 32 --out "$out" > "$out.log"
    echo "$name: $(( $(date +%s) - start )) s"
    [[ -f "$WORK/baseline.jsonl" ]] ||
        grep '"key": "[a-z]*/[0-9]*/0.0"' "$out/results.jsonl" > "$WORK/baseline.jsonl"
done
kill "$SERVER" 2>/dev/null || true
"$BIN/python" bench/heretic/plot_fronts.py "$WORK" "$@"
