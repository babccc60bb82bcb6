#!/usr/bin/env bash
# Run benchmarks/recovery_quality.py on one GPU, detached: per zoo model, one job per route group, at most PARALLEL
# jobs at a time.
# Usage (GPU machine, SmolLM2 installed, from the repository root):
#   bash benchmarks/zoo/recovery_gpu.sh OUT_DIR [extra `recovery_quality.py run` args, e.g. --levels 62.5 --seeds 0]
# MODELS (default "llava llava_next qwen2_5_vl") and ROUTE_GROUPS (default "control;none sft;distill": groups
# separated by ';', routes in a group by spaces) choose the jobs. Each job writes OUT_DIR/<part>.json after every
# row and logs to OUT_DIR/<model>-<group>.log; JOBS (entries "model|routes[|more run args]" separated by ';', e.g.
# "llava|control;llava|distill|--label-weight 0.5") lists the jobs instead, each with its own extra args; OUT_DIR/queue.log says when each job started and ended. Merge the
# parts with `recovery_quality.py merge OUT_DIR/*.json`.
# PARALLEL (default 2): the first H200 run (2026-12-02) started all nine jobs at once and six died of CUDA
# out-of-memory; the jobs that ran held 24-50 GiB each (likely the 49152-token vocabulary's logits of 32 x
# 512-token batches, twice with a teacher; not profiled). Jobs are host-bound: one thread and one dataloader worker each (override with
# OMP_NUM_THREADS / --workers, for all jobs or in a job's own args).
set -euo pipefail
out=$1; shift
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# The jobs run from a private copy of src/ and benchmarks/ (OUT/code): they import modules lazily, row by row, and a
# tree that changes under them (a GPU tool that re-syncs the working tree on every call) would mix two versions.
code="$(cd "$out" && pwd)/code"
rm -rf "$code" && mkdir -p "$code" && cp -a src benchmarks "$code/"
export PYTHONPATH="$code/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "from hf_mla_vlm.assets import load_smollm2; load_smollm2()"  # the safetensors cache, once
jobs=()
if [ -n "${JOBS:-}" ]; then
  IFS=';' read -ra jobs <<< "$JOBS"
else
  IFS=';' read -ra groups <<< "${ROUTE_GROUPS:-control;none sft;distill}"
  for model in ${MODELS:-llava llava_next qwen2_5_vl}; do
    for group in "${groups[@]}"; do
      jobs+=("$model|$group")
    done
  done
fi
# The queue runs in its own session so that it outlives this shell (the GPU tool ends a command's processes).
setsid nohup bash -c '
  out=$1; parallel=$2; code=$3; shift 3
  args=(); while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  for job in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
    model=${job%%|*}; rest=${job#*|}; read -ra routes <<< "${rest%%|*}"; extra=()
    [ "$rest" != "${rest#*|}" ] && read -ra extra <<< "${rest#*|}"
    log="$out/$model-$(IFS=-; echo "${routes[*]}${extra[*]:+-${extra[*]}}" | tr -c "A-Za-z0-9_.\n-" _).log"
    echo "$(date -u +%FT%TZ) start $model ${routes[*]} ${extra[*]}" >> "$out/queue.log"
    workers=(--workers 1); [[ " ${args[*]} ${extra[*]} " == *" --workers "* ]] && workers=()  # one, unless given
    ( python3 "$code/benchmarks/recovery_quality.py" run --model "$model" --routes "${routes[@]}" "${workers[@]}" \
        --out "$out" --workdir "$out/work" "${args[@]}" "${extra[@]}" > "$log" 2>&1 < /dev/null
      echo "$(date -u +%FT%TZ) end $model ${routes[*]} ${extra[*]} rc=$?" >> "$out/queue.log" ) &
  done
  wait
  echo "$(date -u +%FT%TZ) all done" >> "$out/queue.log"
' queue "$out" "${PARALLEL:-2}" "$code" "$@" -- "${jobs[@]}" > "$out/queue.stderr" 2>&1 < /dev/null &
echo "queued ${#jobs[@]} jobs, ${PARALLEL:-2} at a time: $out/queue.log"
