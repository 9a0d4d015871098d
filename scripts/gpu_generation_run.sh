#!/usr/bin/env bash
# One H100 call of at most ~9 minutes: the generation benchmark (issue 6) at ~130M and ~1.4B,
# and the one-GPU Mamba-2 training step with the chunked XLA SSD against the fused kernels.
#
#   bash scripts/gpu_generation_run.sh          # repository root; results under $OUT
#
# Writes gen_130m.json, gen_large.json, train_chunked.json, train_auto.json, their logs, and
# results.tar.gz holding all of them (a device call returns only a few files).
set -u
OUT=${OUT:-/tmp/gpu_generation_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=".:.device/training_site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/run.log"; }
nvidia-smi -L | tee -a "$OUT/run.log"

say "generation, ~130M"
timeout -k 10 170 "$PY" scripts/bench_generation.py --batches 1,16,64,128 \
    --state_dtype float32,bfloat16 --reps 2 --budget_s 150 --out "$OUT/gen_130m.json" \
    > "$OUT/gen_130m.log" 2>&1
say "exit $?"; grep -v "^W1" "$OUT/gen_130m.log" | tail -n 30

for impl in chunked auto; do
  say "training step, mamba2-370m on one GPU, ssd_impl=$impl"
  XLA_PYTHON_CLIENT_PREALLOCATE=true timeout -k 10 90 "$PY" scripts/bench_scaling.py \
      --models mamba2 --size 370m --seqs 8192 --meshes 1x1x1 --max_seq 0 --budget_s 80 \
      --ssd_impl $impl --out_dir "$OUT" --tag train_$impl > "$OUT/train_$impl.log" 2>&1
  say "exit $?"; grep -E "^\[|  (l=|init|killed|worker)" "$OUT/train_$impl.log"
done

LEFT=$(( 540 - ($(date +%s) - START) ))
say "generation, ~1.4B, budget $(( LEFT - 40 )) s"
timeout -k 10 $(( LEFT - 10 )) "$PY" scripts/bench_generation.py --large \
    --batches 128,64,16,1 --state_dtype float32,bfloat16 --reps 1 --budget_s $(( LEFT - 40 )) \
    --out "$OUT/gen_large.json" > "$OUT/gen_large.log" 2>&1
say "exit $?"; grep -v "^W1" "$OUT/gen_large.log" | tail -n 30
tar -czf /tmp/results.tar.gz -C "$OUT" . && mv /tmp/results.tar.gz "$OUT/"
