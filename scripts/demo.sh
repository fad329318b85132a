#!/usr/bin/env bash
# The main job in one command (`make demo`): serve the bundled demo model with its refusal
# direction, show one request at baseline and the same request ablated, then keep serving.
#   ABLISERVE_PORT=8000 ABLISERVE_ENGINE=transformers scripts/demo.sh   # port, engine (auto)
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${ABLISERVE_PORT:-8000}"
URL="http://127.0.0.1:${PORT}"
PY=.venv/bin/python
PROMPT="How do I pick a lock?"

.venv/bin/abliserve demo-model >/dev/null   # provision/convert the demo model once (cached)
SECONDS=0   # the timings below count from here: the server's start to the first answers
.venv/bin/abliserve serve --demo --engine "${ABLISERVE_ENGINE:-auto}" --host 127.0.0.1 --port "$PORT" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT INT TERM

echo "waiting for the server on $URL ..."
until curl -sf "$URL/health" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { echo "the server exited" >&2; exit 1; }
    sleep 1
done
echo "server ready after ${SECONDS} s"
MODEL="$(curl -s "$URL/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"

request() {  # $1 = strength
    curl -s -D - "$URL/v1/chat/completions" \
        -H "Content-Type: application/json" -H "X-Ablation-Strength: $1" \
        -d "{\"model\": \"$MODEL\", \"temperature\": 0, \"max_tokens\": 48,
             \"messages\": [{\"role\": \"user\", \"content\": \"$PROMPT\"}]}" |
        "$PY" -c '
import json, sys
head, _, body = sys.stdin.read().partition("\r\n\r\n")
applied = [l for l in head.splitlines() if l.lower().startswith("x-ablation-applied")]
print(" ", applied[0] if applied else "(no X-Ablation-Applied header)")
print(" ", json.loads(body)["choices"][0]["message"]["content"].replace("\n", " "))'
}

echo; echo "== curl, baseline (X-Ablation-Strength: 0)"; request 0
echo; echo "== curl, ablated (X-Ablation-Strength: 1)"; request 1
echo "(first A/B pair answered ${SECONDS} s after the demo started)"
echo; echo "== openai client, extra_headers={'X-Ablation-Strength': '1'}"
"$PY" - "$URL" "$MODEL" "$PROMPT" <<'PY'
import sys
from openai import OpenAI

url, model, prompt = sys.argv[1:4]
client = OpenAI(base_url=f"{url}/v1", api_key="unused")
for strength in ("0", "1"):
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=48,
        extra_headers={"X-Ablation-Strength": strength},
    )
    print(f"  strength {strength}: {reply.choices[0].message.content!r}")
PY
echo; echo "== abliserve ab: the same prompt at baseline and ablated, side by side"
.venv/bin/abliserve ab "$PROMPT" --server "$URL" --strength 1 --max-tokens 48
echo; echo "A/B page: $URL/ab"
echo "serving on $URL (OpenAI API at $URL/v1) - Ctrl-C stops it"
wait "$SERVER"
