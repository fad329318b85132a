#!/usr/bin/env bash
# Run heretic (bench/heretic/install.sh) offline on the demo checkpoint with the head-to-head
# prompts (bench/heretic/prompts.py) and N trials; results in bench/RESULTS.md.
#   bench/heretic/run_heretic.sh WORK_DIR N_TRIALS [N_STARTUP_TRIALS]
# WORK_DIR gets config.toml, the prompt folders, heretic's Optuna journal (checkpoints/) and
# heretic.log. heretic ends in an interactive menu (which trial to save): the script stops it
# there; the trials are read from the journal (bench/heretic/dump_front.py).
#
# Choices that differ from heretic's defaults, and why:
#   row_normalization = "none"  heretic's default ("full") rescales each weight row after the
#                               edit, which is not a projection of the writer's output, so
#                               abliserve could not apply it; "none" is W <- W - w r r^T W exactly.
#   n_startup_trials            scaled to heretic's default share (60 of 200 trials random).
#   system_prompt               the chat template's default one, which abliserve's evaluation
#                               sends (no system message), so both tools see the same prompts.
#   response_prefix = ""        skips heretic's common-prefix probe (200 generations); this
#                               model's answers share no prefix.
#   dtype float32, cpu, batch 64: what runs on this machine, as abliserve's evaluation does.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="$1" N="$2" STARTUP="${3:-$(( (N * 3 + 9) / 10 ))}"
MODEL="${HERETIC_MODEL:-$HOME/.cache/abliserve/qwen2.5-coder-0.5b-instruct-bf16}"
mkdir -p "$WORK"
"$HERE/../../.venv/bin/python" "$HERE/prompts.py" "$WORK/prompts" >/dev/null

dataset() {  # $1 = prompt folder name
    printf '{ dataset = "%s", split = "train", column = "text" }' "$WORK/prompts/$1"
}
cat > "$WORK/config.toml" <<TOML
model = "$MODEL"
dtypes = ["float32"]
device_map = "cpu"
batch_size = 64
max_response_length = 32
response_prefix = ""
system_prompt = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
row_normalization = "none"
n_trials = $N
n_startup_trials = $STARTUP
seed = ${HERETIC_SEED:-42}
study_checkpoint_dir = "$WORK/checkpoints"
good_prompts = $(dataset good)
bad_prompts = $(dataset bad)
good_evaluation_prompts = $(dataset good_eval)
bad_evaluation_prompts = $(dataset bad_eval)
TOML

cd "$WORK"
start=$(date +%s)
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    nice -n 10 "$HERE/.venv/bin/heretic" < /dev/null > "$WORK/heretic.log" 2>&1 &
HERETIC=$!
# After the last trial heretic opens its menu; stdin is /dev/null, but stop it either way.
while kill -0 "$HERETIC" 2>/dev/null && ! grep -q "Optimization finished" "$WORK/heretic.log"; do
    sleep 10
done
sleep 10
kill "$HERETIC" 2>/dev/null || true
echo "wall_seconds=$(( $(date +%s) - start ))" | tee "$WORK/wall.txt"
