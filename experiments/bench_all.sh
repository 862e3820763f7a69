#!/usr/bin/env bash
# Re-runs every timing table of RESULTS.md, one benchmark after another, each alone:
# before each it waits (up to 15 min) for the 1-minute load average to fall below 1.0,
# since every benchmark refuses to start above it. Needs the real Qwen weights
# (`psynth weights qwen2.5-coder-0.5b-instruct`) and the `hf` extra. About an hour
# on 2 CPU cores.
#
#   experiments/bench_all.sh [OUT_DIR]        # default outputs/bench
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/bench}
mkdir -p "$out"

load() { cut -d' ' -f1 /proc/loadavg; }
alone() {
  local waited=0
  while awk -v l="$(load)" 'BEGIN { exit !(l >= 1.0) }'; do
    if ((waited >= 900)); then echo "[bench_all] load still $(load); skipping: $*" >&2; return 3; fi
    sleep 15
    waited=$((waited + 15))
  done
  echo "[bench_all] $(date -u +%FT%TZ) load $(load): $*"
  "$@"
  echo "[bench_all] rc=$? load after $(load): $*"
}

alone python experiments/bench_decode.py --models tiny,qwen --batches 1,3,16 --repeats 3 --out "$out/decode.json"
alone python experiments/bench_ttft.py --models tiny --repeats 3 --out "$out/ttft_tiny"
alone python experiments/bench_ttft.py --models qwen --ks 3 --lengths 128,512,1024 --repeats 3 --out "$out/ttft_qwen"
alone python experiments/bench_cache_path.py --out "$out/cache_path.json"
alone python experiments/bench_workers.py --models tiny,qwen --prefix-tokens 256,1024 --repeats 2 --out "$out/workers.json"
alone python experiments/bench_train.py --models tiny,qwen05 --out "$out/train.json"
alone psynth demo-qwen --worker-tokens 64 --answer-tokens 48 --out "$out/demo_qwen"
alone psynth demo --out "$out/demo"  # its JSON records its wall time and load
