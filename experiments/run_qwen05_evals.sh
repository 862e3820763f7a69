#!/usr/bin/env bash
# The required real-model runs (Qwen2.5-Coder-0.5B-Instruct, fp32, CPU budgets), one
# after another; each resumes from its records.jsonl, so rerunning this script continues them.
#   bash experiments/run_qwen05_evals.sh            (from the repository root)
set -euo pipefail
MODEL=${MODEL:-$HOME/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct}
run() {  # task limit [extra --set ...]
  local task=$1 limit=$2; shift 2
  python -m psynth_jax.cli eval --config "psynth_jax/configs/eval.py:$task" --model "$MODEL" \
    --workdir "results/eval/qwen05_$task" --limit "$limit" --set batch_problems=16 "$@"
}
run gsm8k 200 --set subset_seed=0
run humaneval 0
run mbpp 200 --set subset_seed=0
