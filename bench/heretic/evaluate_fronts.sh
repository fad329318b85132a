#!/usr/bin/env bash
# Evaluate Pareto fronts of direction artifacts on the test set in ONE abliserve vLLM server:
# every artifact of every front folder is loaded as a named direction, and `abliserve eval`
# screens each at strength 1 on all 100 JailbreakBench behaviours (greedy, 64 new tokens, both
# marker lists) with first-token KL on bench/data/harmless_test.json[:100]. The baseline
# (strength 0) is generated once and seeded into every direction's folder, which `abliserve
# eval` then resumes (as directions/search.sh does); then all directions run at once and the
# server batches them. Everything runs under nice (a long run). Results in bench/RESULTS.md.
#   bench/heretic/evaluate_fronts.sh WORK_DIR FRONT_DIR...
# e.g. bench/heretic/evaluate_fronts.sh /tmp/h2h-eval /work/h2h/heretic-front /work/h2h/abliserve-front
# Directions already evaluated at strength 1 are skipped, so a second front can be added by
# rerunning with both folders. Ends with bench/heretic/plot_fronts.py.
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

source scripts/measure_server.sh
NICE=10 start_measure_server "$WORK/server.log" "$PORT" "${directions[@]}"

evaluate() {  # $1 = direction name, $2 = strengths
    nice -n 10 "$BIN/abliserve" eval --server "http://127.0.0.1:$PORT" --direction "$1" \
        --harmful bench/data/jbb_harmful.csv --kl-harmless bench/data/harmless_test.json \
        --limit 100 --strengths "$2" --max-tokens 64 --concurrency 24 --out "$WORK/eval/$1"
}
# The shared baseline once, then every direction at once: the server batches their requests.
if [[ ! -f "$WORK/baseline.jsonl" ]]; then
    evaluate "${names[0]}" 0 > "$WORK/eval/baseline.log"
    grep '"key": "[a-z]*/[0-9]*/0.0"' "$WORK/eval/${names[0]}/results.jsonl" > "$WORK/baseline.jsonl"
fi
start=$(date +%s)
for name in "${names[@]}"; do
    grep -qs '"strength": 1' "$WORK/eval/$name/summary.json" && continue
    mkdir -p "$WORK/eval/$name"
    [[ -f "$WORK/eval/$name/results.jsonl" ]] || cp "$WORK/baseline.jsonl" "$WORK/eval/$name/results.jsonl"
    evaluate "$name" 1 > "$WORK/eval/$name.log" 2>&1 &
done
for job in $(jobs -p); do [[ "$job" == "$MEASURE_SERVER" ]] || wait "$job"; done
echo "evaluated ${#names[@]} directions in $(( $(date +%s) - start )) s (after the baseline)"
kill "$MEASURE_SERVER" 2>/dev/null || true
"$BIN/python" bench/heretic/plot_fronts.py "$WORK" "$@"
