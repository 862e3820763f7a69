#!/usr/bin/env bash
# The training issue's runs on one model: stage-1 traces (full and a quarter), one adapter
# per arm, then the held-out CE of every arm against the text teacher. Each step resumes
# (the builds are skipped when their files exist, the trainer restores its checkpoints), so
# rerunning this script continues.
#   bash experiments/run_training.sh smollm2 "both mapper_only lora_only kl quarter"
#   bash experiments/run_training.sh qwen05 "both quarter"
set -euo pipefail
MODEL=$1                      # smollm2 | qwen05 (its config: psynth_jax/configs/<file>.py)
ARMS=${2:-"both quarter"}
LIMIT=${LIMIT:-200}           # stage-1 train problems per route (the quarter: LIMIT / 4)
case $MODEL in
  smollm2) CONFIG=psynth_jax/configs/smollm2_135m.py ;;
  qwen05) CONFIG=psynth_jax/configs/qwen2_5_coder_0_5b.py ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
build() {  # out limit
  [ -f "$1/data_card.json" ] && return
  python experiments/build_stage1.py --limit "$2" --out "$1" --budget "$CONFIG:stage1"
}
build "runs/$MODEL/stage1" "$LIMIT"
build "runs/$MODEL/stage1_quarter" $((LIMIT / 4))
adapters=()
for arm in $ARMS; do
  arg=stage1; [ "$arm" != both ] && arg="stage1,$arm"
  work="runs/train/$MODEL/stage1_$arm"
  python experiments/train.py --config "$CONFIG:$arg" --workdir "$work"
  mkdir -p "results/train/$MODEL" && cp "$work/metrics.jsonl" "results/train/$MODEL/stage1_${arm}_metrics.jsonl"
  adapters+=(--adapter "$arm=$work/export")
done
python experiments/heldout_ce.py --config "$CONFIG:stage1" --jsonl "runs/$MODEL/stage1/validation.jsonl" \
  "${adapters[@]}" --out "results/train/$MODEL/heldout_stage1.json"
