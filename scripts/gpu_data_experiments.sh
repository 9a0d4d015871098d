#!/usr/bin/env bash
# Runs the gpu variants of the DNA or audio experiment configs on one GPU host that has no data
# packages: the data comes from a cache directory built here beforehand with
#   .venv/bin/python scripts/build_data_cache.py experiments/configs/dna_pretrain.py:gpu \
#       experiments/configs/great_apes.py:gpu --cache .device/data_cache_dna
#   .venv/bin/python scripts/build_data_cache.py experiments/configs/audio_piano.py:gpu \
#       experiments/configs/sc09.py:gpu --cache .device/data_cache_audio
# and carried along with the training packages (.device/training_site: grain, ml_collections).
#
#   bash scripts/gpu_data_experiments.sh CONFIG...   (dna_pretrain great_apes audio_piano sc09)
#
# Each config runs under `timeout $LIMIT_S` (default 230 s). Writes, under $OUT (default
# /tmp/gpu_data_out): <config>.log (the whole run), and <config>/results.{json,md,png} +
# <config>/<row>/{metrics.jsonl,final_eval.json} (checkpoints stay in /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$#" = 0 ]; then
  echo "usage: $0 CONFIG... (dna_pretrain great_apes audio_piano sc09)" >&2
  exit 2
fi
limit="${LIMIT_S:-230}"
OUT="${OUT:-/tmp/gpu_data_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.device/training_site:$PWD" PYTHONUNBUFFERED=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.log"
status=0
for c in "$@"; do
  case "$c" in
    dna_pretrain|great_apes) export MAMBA_JAX_CACHE="$PWD/.device/data_cache_dna" ;;
    audio_piano|sc09) export MAMBA_JAX_CACHE="$PWD/.device/data_cache_audio" ;;
    *) echo "unknown config $c" >&2; status=2; continue ;;
  esac
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
