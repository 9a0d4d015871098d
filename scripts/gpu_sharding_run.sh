#!/usr/bin/env bash
# Sharding on real GPUs in one call of at most ~9 minutes: the equality checks and the scaling
# benchmark on 2 GPUs, then on 4 GPUs (issues 8 and 11).
#
#   bash scripts/gpu_sharding_run.sh            # repository root, results under $OUT
#
# On a host with 4 or more GPUs, phase 1 runs the 2-GPU checks on GPUs 2,3 while the 2-GPU
# benchmark runs on GPUs 0,1 (separate devices, so the timings do not share a GPU); phase 2
# runs the 4-GPU checks, phase 3 the 4-GPU benchmark with what is left of TOTAL_S. On a
# 2-GPU host phases 1 run one after the other and the 4-GPU phases are skipped.
# NVLink multicast stays off (the scripts set the same variables before importing jax).
#
# Writes (8 files): run.log (every step's output), sharding_2gpu.json, sharding_4gpu.json,
# scaling_2gpu.{json,png}, scaling_4gpu.{json,png}, scaling.md (both markdown tables).
set -u
OUT=${OUT:-/tmp/gpu_sharding_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=".:.device/training_site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
TOTAL=${TOTAL_S:-520}
LOG="$OUT/run.log"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
TMP=$(mktemp -d)

nvidia-smi -L 2>&1 | tee -a "$LOG"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
say "GPUs: $NGPU; budget ${TOTAL} s; OUT=$OUT"
rm -f "$OUT/scaling.md"

CHECK2=(scripts/check_sharding_gpu.py --budget_s 120 --out "$OUT/sharding_2gpu.json")
BENCH2=(scripts/bench_scaling.py --models mamba2 --size 370m --seqs 8192,32768
        --search_meshes 1x1x1,1x1x2 --search_from 131072 --search_share 0.4
        --out_dir "$OUT" --tag scaling_2gpu
        --markdown "$OUT/scaling.md")

if [ "$NGPU" -ge 4 ]; then
  say "phase 1: 2-GPU checks on GPUs 2,3 | 2-GPU benchmark on GPUs 0,1"
  ( CUDA_VISIBLE_DEVICES=2,3 timeout -k 10 160 "$PY" "${CHECK2[@]}" > "$TMP/check2.log" 2>&1;
    echo "check_sharding_gpu 2 GPUs exit $?" >> "$TMP/check2.log" ) &
  ( CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 170 "$PY" "${BENCH2[@]}" --budget_s 150 \
      > "$TMP/bench2.log" 2>&1; echo "bench_scaling 2 GPUs exit $?" >> "$TMP/bench2.log" ) &
  wait
  cat "$TMP/check2.log" "$TMP/bench2.log" >> "$LOG"
  tail -n 45 "$TMP/check2.log"; tail -n 30 "$TMP/bench2.log"

  say "phase 2: 4-GPU checks"
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 110 "$PY" scripts/check_sharding_gpu.py \
      --budget_s 70 --out "$OUT/sharding_4gpu.json" 2>&1 | tee -a "$LOG"
  say "check_sharding_gpu 4 GPUs exit ${PIPESTATUS[0]}"

  B4=$(( $(left) - 25 ))
  if [ "$B4" -ge 60 ]; then
    say "phase 3: 4-GPU benchmark, budget $B4 s"
    CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 $(( B4 + 20 )) "$PY" scripts/bench_scaling.py \
        --models mamba2,transformerpp --size 1.4b --seqs 8192,32768 \
        --meshes 1x1x1,1x1x4,1x4x1,4x1x1,2x2x1,1x2x2 \
        --search_meshes 1x1x1,1x1x4 --search_from 131072 --search_share 0.3 \
        --budget_s "$B4" \
        --out_dir "$OUT" --tag scaling_4gpu --markdown "$OUT/scaling.md" 2>&1 | tee -a "$LOG"
    say "bench_scaling 4 GPUs exit ${PIPESTATUS[0]}"
  else
    say "phase 3 skipped: only $(left) s left"
  fi
else
  say "phase 1 (2 GPUs, one after the other)"
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 160 "$PY" "${CHECK2[@]}" 2>&1 | tee -a "$LOG"
  B2=$(( $(left) - 25 ))
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 $(( B2 + 20 )) "$PY" "${BENCH2[@]}" --budget_s "$B2" 2>&1 \
      | tee -a "$LOG"
  say "fewer than 4 GPUs: the 4-GPU phases are skipped"
fi
rm -rf "$TMP"
say "done; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
