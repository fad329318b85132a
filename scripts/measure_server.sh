# Sourced by the long measurement scripts (directions/search.sh, bench/heretic/evaluate_fronts.sh):
# they all screen many named directions in one demo-model vLLM server, in float32, with the same
# small KV cache, so the server they start is started here, once.
#   start_measure_server LOG PORT [abliserve serve arguments...]
# Starts the server in the background under nice (NICE, default 0), stops it when the calling
# script exits, and returns once /health answers; if the server dies first, its log's tail is
# printed and the script exits 1. Run from the repository root.

start_measure_server() {
    local log="$1" port="$2"
    shift 2
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" nice -n "${NICE:-0}" \
        .venv/bin/abliserve serve --model demo --engine vllm --dtype float32 \
        --max-model-len 1024 --port "$port" "$@" > "$log" 2>&1 &
    MEASURE_SERVER=$!
    trap 'kill "$MEASURE_SERVER" 2>/dev/null || true' EXIT
    until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
        kill -0 "$MEASURE_SERVER" 2>/dev/null || { tail -20 "$log"; exit 1; }
        sleep 2
    done
}
