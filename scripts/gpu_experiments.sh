#!/usr/bin/env bash
# Runs experiment configs on one GPU host that has no pip or data packages, several at a time
# (the small models leave the GPU mostly idle; compilation is on the host's CPU cores).
#
#   JOBS=8 LIMIT_S=540 bash scripts/gpu_experiments.sh SPEC...
#   SPEC = "CONFIG_FILE:VARIANT [--config.FIELD=VALUE ...]", one quoted argument per run, e.g.
#     bash scripts/gpu_experiments.sh "ablations.py:selective" "lm.py:scaling --config.num_train_steps=800"
#
# What each run needs on the host, beside the checkout (carry these):
#   .device/training_site  grain, ml_collections (every run)
#   .device/text_site      the Shakespeare texts (lm.py, ablations.py)
#   .device/data_cache_dna / .device/data_cache_audio  the parsed / synthesized data of the DNA
#     (dna_pretrain, great_apes) and audio (audio_piano, sc09) configs, built here beforehand:
#       .venv/bin/python scripts/build_data_cache.py experiments/configs/dna_pretrain.py:gpu \
#           experiments/configs/great_apes.py:gpu --cache .device/data_cache_dna
#       .venv/bin/python scripts/build_data_cache.py experiments/configs/audio_piano.py:gpu \
#           experiments/configs/sc09.py:gpu --cache .device/data_cache_audio
#
# Each run gets `timeout $LIMIT_S` (default 540 s) and the workdir $WORK/<name> (default
# .device/runs, inside the checkout, so a second call on the same warm host resumes unfinished
# rows and keeps finished ones). At the end everything small (logs, results.{json,md,png},
# each row's metrics.jsonl and final_eval.json; not checkpoints) is packed into
# $OUT/experiments.tar.gz, with a summary of every run's status in $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$#" = 0 ]; then
  echo "usage: $0 \"CONFIG_FILE:VARIANT [--config.FIELD=VALUE ...]\"..." >&2
  exit 2
fi
jobs="${JOBS:-8}"
limit="${LIMIT_S:-540}"
OUT="${OUT:-/tmp/gpu_experiments_out}"
WORK="${WORK:-$PWD/.device/runs}"
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH="$PWD/.device/training_site:$PWD/.device/text_site:$PWD" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$WORK/logs/env.log"

run_one() {  # $1 = spec
  local spec="$1" config variant name rc start
  read -r -a words <<< "$spec"
  config="${words[0]%%:*}"
  variant="${words[0]#*:}"
  name="${config%.py}_${variant}"
  [ "${#words[@]}" -gt 1 ] && name="${name}_$(printf '%s' "${words[*]:1}" | md5sum | cut -c1-6)"
  case "$config" in
    dna_pretrain.py|great_apes.py) export MAMBA_JAX_CACHE="$PWD/.device/data_cache_dna" ;;
    audio_piano.py|sc09.py) export MAMBA_JAX_CACHE="$PWD/.device/data_cache_audio" ;;
  esac
  start=$SECONDS
  timeout "$limit" python3 -m experiments.main --config="experiments/configs/$config:$variant" \
      --config.tensorboard=False --workdir="$WORK/$name" "${words[@]:1}" \
      >> "$WORK/logs/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc wall_s=$((SECONDS - start)) spec=$spec" | tee -a "$WORK/logs/$name.log"
}

for spec in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 2; done
  run_one "$spec" &
  sleep 1
done
wait

grep -h "rc=.* wall_s=" "$WORK"/logs/*.log > "$OUT/summary.txt"
cat "$OUT/summary.txt"
(cd "$WORK" && find . -name '*.log' -o -name 'results.*' -o -name metrics.jsonl \
    -o -name final_eval.json | tar czf "$OUT/experiments.tar.gz" -T -)
ls -la "$OUT"
