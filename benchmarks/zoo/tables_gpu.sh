#!/usr/bin/env bash
# Zoo quality grid (one process per model) and recovery runs, detached, on one GPU machine.
# Usage: bash benchmarks/zoo/tables_gpu.sh OUT_DIR
set -uo pipefail
out=$1; mkdir -p "$out"
export OMP_NUM_THREADS=3 MKL_NUM_THREADS=3
for name in llava llava_next qwen2_5_vl; do
  setsid nohup python3 benchmarks/zoo_quality.py run --model "$name" --out "$out" --partial "$out/partial_$name.json" \
    > "$out/quality_$name.log" 2>&1 < /dev/null &
done
setsid nohup bash -c "for name in llava llava_next qwen2_5_vl; do python3 benchmarks/zoo_recovery.py run --model \$name \
  --out $out/recovery > $out/recovery_\$name.log 2>&1; done" < /dev/null > /dev/null 2>&1 &
