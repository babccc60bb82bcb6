#!/usr/bin/env bash
# Train the three zoo models concurrently on one GPU (vision side, and an LM delta with --lm-rank), each with a time budget.
# Usage (GPU machine, SmolLM2 installed): bash benchmarks/zoo/train_gpu.sh MINUTES OUT_DIR [extra `zoo train` args]
# Runs detached (setsid) so that it outlives the launching shell; logs go to OUT_DIR/<name>.log.
# ZOO_INIT_DIR=DIR continues each model from DIR/<name>.safetensors (e.g. src/hf_mla_vlm/zoo/weights).
set -euo pipefail
minutes=$1; out=$2; shift 2
mkdir -p "$out"
for name in llava llava_next qwen2_5_vl; do
  init=()
  if [[ -n "${ZOO_INIT_DIR:-}" ]]; then init=(--init "$ZOO_INIT_DIR/$name.safetensors"); fi
  setsid nohup python3 -m hf_mla_vlm.cli zoo train "$name" --out "$out" --max-minutes "$minutes" --steps 1000000 \
    --num-workers 4 --quiet "${init[@]}" "$@" > "$out/$name.log" 2>&1 < /dev/null &
done
