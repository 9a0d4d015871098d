#!/usr/bin/env bash
# Runs the gpu variants of the DNA or audio experiment configs on one GPU host that has no data
# packages: the data comes from a cache directory built here beforehand with
#   .venv/bin/python scripts/build_data_cache.py experiments/configs/dna_pretrain.py:gpu \
#       experiments/configs/great_apes.py:gpu --cache .device/data_cache_dna
#   .venv/bin/python scripts/build_data_cache.py experiments/configs/audio_piano.py:gpu \
#       experiments/configs/sc09.py:gpu --cache .device/data_cache_audio
# and carried along with the training packages (.device/training_site: grain, ml_collections).
#
#   bash scripts/gpu_data_experiments.sh dna|audio [SECONDS_PER_CONFIG]
#
# Writes, under $OUT (default /tmp/gpu_data_out): <config>.log (the whole run), and
# <config>/results.{json,md,png} + <config>/<row>/metrics.jsonl (checkpoints stay in /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
group="${1:?usage: $0 dna|audio [SECONDS_PER_CONFIG]}"
limit="${2:-280}"
case "$group" in
  dna) configs=(dna_pretrain great_apes) ;;
  audio) configs=(audio_piano sc09) ;;
  *) echo "group must be dna or audio, got $group" >&2; exit 2 ;;
esac
OUT="${OUT:-/tmp/gpu_data_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.device/training_site:$PWD" PYTHONUNBUFFERED=1
export MAMBA_JAX_CACHE="$PWD/.device/data_cache_$group"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.log"
status=0
for c in "${configs[@]}"; do
  work="/tmp/gpu_data_runs/$c"
  rm -rf "$work"
  start=$SECONDS
  timeout "$limit" python3 -m experiments.main --config="experiments/configs/$c.py:gpu" \
      --workdir="$work" > "$OUT/$c.log" 2>&1
  rc=$?
  echo "$c: rc=$rc wall_s=$((SECONDS - start))" | tee -a "$OUT/$c.log"
  [ "$rc" = 0 ] || status=1
  mkdir -p "$OUT/$c"
  cp "$work"/results.* "$OUT/$c/" 2>/dev/null
  for row in "$work"/*/; do
    [ -f "$row/metrics.jsonl" ] || continue
    mkdir -p "$OUT/$c/$(basename "$row")"
    cp "$row"/metrics.jsonl "$row"/final_eval.json "$OUT/$c/$(basename "$row")/" 2>/dev/null
  done
  grep -E "first step|step [0-9]+/[0-9]+ .*loss|^\|" "$OUT/$c.log" | tail -20
done
exit "$status"
