#!/usr/bin/env bash
# Train the three zoo vision towers concurrently on one GPU (SmolLM2 frozen), each with a time budget.
# Usage (GPU machine, SmolLM2 installed): bash benchmarks/zoo/train_gpu.sh MINUTES OUT_DIR [extra `zoo train` args]
# Runs detached (setsid) so that it outlives the launching shell; logs go to OUT_DIR/<name>.log.
set -euo pipefail
minutes=$1; out=$2; shift 2
mkdir -p "$out"
for name in llava llava_next qwen2_5_vl; do
  setsid nohup python3 -m hf_mla_vlm.cli zoo train "$name" --out "$out" --max-minutes "$minutes" --steps 1000000 \
    --num-workers 4 --quiet "$@" > "$out/$name.log" 2>&1 < /dev/null &
done
