#!/usr/bin/env bash
# Sharding and scaling on a 4-GPU host, in calls of at most ~9.5 minutes each (issues 8, 11).
#
#   PART=1 bash scripts/gpu_sharding_run.sh      # repository root, results under $OUT
#   PART=2 bash scripts/gpu_sharding_run.sh      # (and PART=3, PART=4: see below)
#
# Part 1 (issue 8 and the one-GPU baselines of issue 11), three jobs at once on disjoint GPUs:
#   GPUs 2,3  the 2-GPU equality checks (every strategy of check_sharding_gpu.py for N = 2),
#             then the 2-GPU meshes of a ~370M Mamba-2 (2x1x1, 1x2x1, 1x1x2) at 8K-64K and
#             the longest sequence that trains under sequence parallelism;
#   GPU 0     the same ~370M Mamba-2 on one GPU (the baseline) and its longest sequence;
#   GPU 1     the ~1.4B Mamba-2 and Transformer++ on one GPU at 8K, 32K, 128K.
# Part 2 (issue 11) on all four GPUs: the 4-GPU checks not run before (mixed meshes,
#   Mamba-1, Transformer++), then the ~1.4B meshes 4x1x1, 1x4x1, 1x1x4, 2x2x1, 1x2x2.
# Part 3, what parts 1-2 left on 2026-11-22: the 4-GPU Mamba-1 and Transformer++ checks and
#   the checkpoint restores, then the Transformer++ 2x2x1 row.
# Part 4: the longest 1.4B Mamba-2 sequence per 4-GPU mesh (doubling from 256K), and the
#   1-GPU / 1x1x4 rows again with the fused SSD kernels (--ssd_impl auto, the default).
# Parts 1-3 measure with --ssd_impl chunked (the tables of docs/scaling.md).
# Jobs on disjoint GPUs do not share a GPU, so their timings stand; merged tables
# (bench_scaling.py --merge) take the efficiencies against the one-GPU rows.
# NVLink multicast stays off (the scripts set the same variables before importing jax).
set -u
OUT=${OUT:-/tmp/gpu_sharding_out}
PART=${PART:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=".:.device/training_site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
TOTAL=${TOTAL_S:-540}
LOG="$OUT/run.log"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
BENCH="scripts/bench_scaling.py --ssd_impl chunked"  # parts 1-3: as docs/scaling.md measured

nvidia-smi -L 2>&1 | tee -a "$LOG"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
say "GPUs: $NGPU; part $PART; budget ${TOTAL} s; OUT=$OUT"
if [ "$NGPU" -lt 4 ]; then
  say "this script needs 4 GPUs (see check_sharding_gpu.py and bench_scaling.py for fewer)"
  exit 2
fi

if [ "$PART" = 1 ]; then
  ( CUDA_VISIBLE_DEVICES=2,3 timeout -k 10 250 "$PY" scripts/check_sharding_gpu.py \
        --budget_s 220 --out "$OUT/sharding_2gpu.json" > "$OUT/check2.log" 2>&1
    echo "check_sharding_gpu 2 GPUs exit $?" >> "$OUT/check2.log"
    B=$(( $(left) - 15 ))
    CUDA_VISIBLE_DEVICES=2,3 timeout -k 10 $(( B + 10 )) "$PY" $BENCH --models mamba2 \
        --size 370m --seqs 8192,16384,32768,65536 --meshes 2x1x1,1x2x1,1x1x2 \
        --search_meshes 1x1x2 --search_from 262144 --max_seq 4194304 --search_share 0.4 \
        --budget_s "$B" --out_dir "$OUT" --tag m2_370m_2gpu > "$OUT/bench_370m_2gpu.log" 2>&1
    echo "bench 370m 2 GPUs exit $?" >> "$OUT/bench_370m_2gpu.log" ) &
  ( CUDA_VISIBLE_DEVICES=0 timeout -k 10 $(( TOTAL - 20 )) "$PY" $BENCH --models mamba2 \
        --size 370m --seqs 8192,16384,32768,65536 --meshes 1x1x1 --search_from 131072 \
        --max_seq 4194304 --search_share 0.6 --budget_s $(( TOTAL - 30 )) --out_dir "$OUT" \
        --tag m2_370m_1gpu > "$OUT/bench_370m_1gpu.log" 2>&1
    echo "bench 370m 1 GPU exit $?" >> "$OUT/bench_370m_1gpu.log" ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout -k 10 300 "$PY" $BENCH --models mamba2 --size 1.4b \
        --seqs 8192,32768,131072 --meshes 1x1x1 --search_from 262144 --search_share 0.4 \
        --budget_s 290 --out_dir "$OUT" --tag m2_1p4b_1gpu > "$OUT/bench_1p4b_1gpu.log" 2>&1
    echo "bench 1.4b mamba2 1 GPU exit $?" >> "$OUT/bench_1p4b_1gpu.log"
    B=$(( $(left) - 20 ))
    CUDA_VISIBLE_DEVICES=1 timeout -k 10 $(( B + 10 )) "$PY" $BENCH --models transformerpp \
        --size 1.4b --seqs 8192,32768,131072 --meshes 1x1x1 --max_seq 0 --budget_s "$B" \
        --out_dir "$OUT" --tag tpp_1p4b_1gpu >> "$OUT/bench_1p4b_1gpu.log" 2>&1
    echo "bench 1.4b transformerpp 1 GPU exit $?" >> "$OUT/bench_1p4b_1gpu.log" ) &
  wait
  cat "$OUT/check2.log" "$OUT/bench_370m_1gpu.log" "$OUT/bench_370m_2gpu.log" \
      "$OUT/bench_1p4b_1gpu.log" >> "$LOG"
  grep -v "^\s*$" "$OUT/check2.log" | tail -n 20
  for f in bench_370m_1gpu bench_370m_2gpu bench_1p4b_1gpu; do
    grep -E "^\[|  (l=|init|killed|worker)|exit" "$OUT/$f.log"
  done
  "$PY" $BENCH --merge "$OUT/m2_370m_1gpu.json,$OUT/m2_370m_2gpu.json" --out_dir "$OUT" \
      --tag scaling_370m_2gpu 2>&1 | tail -n 30
elif [ "$PART" = 3 ]; then
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 300 "$PY" scripts/check_sharding_gpu.py \
      --only mamba1_tp4,mamba1_sp4,mamba1_tp2_sp2,transformerpp_tp4,transformerpp_fsdp4,transformerpp_dp2_tp2 \
      --out "$OUT/sharding_4gpu_m1_tpp.json" 2>&1 | tee -a "$LOG" | grep -v "^W1"
  say "check_sharding_gpu 4 GPUs exit ${PIPESTATUS[0]}"
  B=$(( $(left) - 20 ))
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 $(( B + 10 )) "$PY" $BENCH \
      --models transformerpp --size 1.4b --seqs 8192,32768,131072 --meshes 2x2x1 --max_seq 0 \
      --budget_s "$B" --out_dir "$OUT" --tag tpp_1p4b_2x2x1 2>&1 | tee -a "$LOG"
  say "bench_scaling exit ${PIPESTATUS[0]}"
elif [ "$PART" = 4 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 130 "$PY" scripts/bench_scaling.py --ssd_impl auto \
      --models mamba2 --size 1.4b --seqs 8192,32768 --meshes 1x1x1 --max_seq 0 --budget_s 120 \
      --out_dir "$OUT" --tag m2_1p4b_1gpu_auto 2>&1 | tee -a "$LOG"
  B=$(( $(left) - 20 ))
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 $(( B + 10 )) "$PY" scripts/bench_scaling.py \
      --ssd_impl auto --models mamba2 \
      --size 1.4b --seqs 131072 --meshes 1x1x4,1x2x2,2x2x1,1x4x1 --search_from 262144 \
      --max_seq 4194304 --search_share 0.7 --budget_s "$B" --out_dir "$OUT" \
      --tag m2_1p4b_4gpu_auto_longest 2>&1 | tee -a "$LOG"
  say "bench_scaling exit ${PIPESTATUS[0]}"
elif [ "$PART" = 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 130 "$PY" scripts/check_sharding_gpu.py \
      --budget_s 100 --only dp2_tp2,tp2_sp2,dp2_sp2,fsdp2_tp2,mamba1_tp4,mamba1_sp4,mamba1_tp2_sp2,transformerpp_tp4,transformerpp_fsdp4,transformerpp_dp2_tp2 \
      --out "$OUT/sharding_4gpu.json" 2>&1 | tee -a "$LOG" | grep -v "^W1"
  say "check_sharding_gpu 4 GPUs exit ${PIPESTATUS[0]}"
  B=$(( $(left) - 20 ))
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout -k 10 $(( B + 10 )) "$PY" $BENCH \
      --models mamba2,transformerpp --size 1.4b --seqs 8192,32768,131072 \
      --meshes 1x1x4,1x4x1,4x1x1,2x2x1,1x2x2 --search_meshes 1x1x4 --search_from 524288 \
      --search_share 0.2 --budget_s "$B" --out_dir "$OUT" --tag scaling_1p4b_4gpu_only \
      2>&1 | tee -a "$LOG"
  say "bench_scaling 4 GPUs exit ${PIPESTATUS[0]}"
else
  say "PART must be 1, 2, 3 or 4, got '$PART'"
  exit 2
fi
say "done; files in $OUT (also in results.tar.gz: a call returns only a few files):"
ls -la "$OUT" | tee -a "$LOG"
tar -czf /tmp/results.tar.gz -C "$OUT" . && mv /tmp/results.tar.gz "$OUT/"
