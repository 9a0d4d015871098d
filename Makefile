# Quick start: `make demo` runs the main job on a CPU-sized default (the selective-copying
# experiment of the Mamba paper, tiny variant, ~4 min on 2 cores); `make test` runs the test suite.
# Both create .venv (Python >= 3.12) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/selective_copying_tiny

.PHONY: setup demo demo-ops test test-all clean fixtures

setup:
	@bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) -m experiments.main --config=experiments/configs/selective_copying.py:tiny --workdir=$(WORKDIR)

demo-ops: setup
	$(PY) scripts/demo_ops.py

test: setup
	$(PY) -m pytest -q -n 2 --durations=15

test-all: setup
	$(PY) -m pytest -q -n 2 --run-slow

clean:
	rm -rf $(VENV) .pytest_cache

# Regenerates the HF parity fixtures under tests/fixtures/hf/ (needs torch: a separate Python 3.11 env).
fixtures:
	python3 -m venv /tmp/fixenv && /tmp/fixenv/bin/pip install -q torch==2.13.0 transformers==5.23.0 safetensors==0.8.0 numpy==2.4.6
	/tmp/fixenv/bin/python tests/fixtures/make_hf_fixtures.py
