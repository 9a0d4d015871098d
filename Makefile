# Quick start: `make demo` runs the main job on a CPU-sized default; `make test` runs the test suite.
# Both create .venv (Python >= 3.12) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all clean

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) scripts/demo_ops.py

test: setup
	$(PY) -m pytest -q -n 2

test-all: setup
	$(PY) -m pytest -q -n 2 --run-slow

clean:
	rm -rf $(VENV) .pytest_cache
