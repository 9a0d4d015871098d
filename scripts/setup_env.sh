#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs the project (editable) with its test extra.
# Re-runs the install only when pyproject.toml changed. Usage: scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
stamp="$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"

python_ok() {  # prints the interpreter's path if it runs and is >= 3.12
  "$1" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

find_python() {
  local candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  candidates+=(python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1; then
    # pyenv shims fail unless the version is selected: ask for the interpreters directly.
    for v in $(pyenv root)/versions/3.1[2-9]*; do candidates+=("$v/bin/python3"); done
  fi
  for c in "${candidates[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if found=$(python_ok "$c"); then echo "$found"; return 0; fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  if ! py=$(find_python); then
    echo "error: mamba_jax needs Python >= 3.12 (jax 0.11 requires it) and none was found." >&2
    echo "Install one (e.g. 'apt-get install python3.12-venv', or 'pyenv install 3.12')," >&2
    echo "or point PYTHON at it: PYTHON=/path/to/python3.12 $0" >&2
    exit 1
  fi
  echo "setup: creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
