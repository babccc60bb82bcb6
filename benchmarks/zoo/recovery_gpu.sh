#!/usr/bin/env bash
# Launch benchmarks/recovery_quality.py on one GPU, detached: per zoo model, one process per route group.
# Usage (GPU machine, SmolLM2 installed, from the repository root):
#   bash benchmarks/zoo/recovery_gpu.sh OUT_DIR [extra `recovery_quality.py run` args, e.g. --levels 62.5 --seeds 0]
# MODELS (default "llava llava_next qwen2_5_vl") and ROUTE_GROUPS (default "control;none sft;distill": groups
# separated by ';', routes in a group by spaces) choose the processes. Each process writes OUT_DIR/<part>.json after every row and
# logs to OUT_DIR/<model>-<group>.log; merge the parts with `recovery_quality.py merge OUT_DIR/*.json`.
# Processes are host-bound: one thread and one dataloader worker each (override with OMP_NUM_THREADS / --workers).
# Not run on the GPU machine yet (2026-12-02): the layout is the README's untested one.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
python3 -c "from hf_mla_vlm.assets import load_smollm2; load_smollm2()"  # the safetensors cache, once
IFS=';' read -ra groups <<< "${ROUTE_GROUPS:-control;none sft;distill}"
for model in ${MODELS:-llava llava_next qwen2_5_vl}; do
  for group in "${groups[@]}"; do
    read -ra routes <<< "$group"
    log="$out/$model-$(IFS=-; echo "${routes[*]}").log"
    setsid nohup python3 benchmarks/recovery_quality.py run --model "$model" --routes "${routes[@]}" --workers 1 \
      --out "$out" --workdir "$out/work" "$@" > "$log" 2>&1 < /dev/null &
  done
done
