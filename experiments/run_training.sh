#!/usr/bin/env bash
# The training issue's runs on one model: stage-1 traces (full and a quarter), one adapter
# per arm, then the held-out CE of every arm against the text teacher. Each step resumes
# (the builds are skipped when their files exist, the trainer restores its checkpoints, an
# arm with its held-out CE in results/ is skipped), so rerunning this script continues.
# Each arm's metrics and held-out CE are copied to results/ as soon as it ends: runs/ is
# git-ignored and may not outlive the session.
#   LIMIT=50 bash experiments/run_training.sh smollm2 "both mapper_only lora_only kl quarter text"
#   bash experiments/run_training.sh qwen05 "both quarter"
set -euo pipefail
MODEL=$1                      # smollm2 | qwen05 (its config: psynth_jax/configs/<file>.py)
ARMS=${2:-"both quarter"}
LIMIT=${LIMIT:-200}           # stage-1 train problems per route (the quarter: LIMIT / 4)
# Held-out traces: the build's own validation split (LIMIT / 20 per route). Splits are by
# problem group, so any build's validation split is disjoint from every build's train split:
# a small LIMIT can be judged on a larger build's validation.jsonl.
HELDOUT=${HELDOUT:-runs/$MODEL/stage1/validation.jsonl}
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
RESULTS_DIR=${RESULTS_DIR:-results/train/$MODEL}
mkdir -p "$RESULTS_DIR"
cp "runs/$MODEL/stage1/data_card.json" "$RESULTS_DIR/stage1_data_card.json"
cp "runs/$MODEL/stage1_quarter/data_card.json" "$RESULTS_DIR/stage1_quarter_data_card.json"
for arm in $ARMS; do
  arg=stage1; [ "$arm" != both ] && arg="stage1,$arm"
  work="runs/train/$MODEL/stage1_$arm"
  out="$RESULTS_DIR/heldout_stage1_$arm.json"
  [ -f "$out" ] && { echo "$arm: done ($out)"; continue; }
  python experiments/train.py --config "$CONFIG:$arg" --workdir "$work"
  cp "$work/metrics.jsonl" "$RESULTS_DIR/stage1_${arm}_metrics.jsonl"
  flag=--adapter; name=$arm
  if [ "$arm" = text ]; then  # a LoRA of the text synthesizer ("text" names the teacher)
    flag=--text-adapter; name=text_lora
  fi
  python experiments/heldout_ce.py --config "$CONFIG:stage1" \
    --jsonl "$HELDOUT" "$flag" "$name=$work/export" --out "$out"
done
