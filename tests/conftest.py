"""Test configuration: float64 available everywhere, markers for GPU/TPU/slow tests."""

import jax
import pytest

# Oracles are compared in float64 on CPU. Tests pick every dtype explicitly.
jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="run tests marked slow (too slow for CI on 2 CPU cores)")


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run it")
  skip_gpu = pytest.mark.skip(reason=f"needs a GPU; the default backend is {backend}")
  skip_tpu = pytest.mark.skip(reason=f"needs a TPU; the default backend is {backend}")
  for item in items:
    if "slow" in item.keywords and not config.getoption("--run-slow"):
      item.add_marker(skip_slow)
    if "gpu" in item.keywords and backend != "gpu":
      item.add_marker(skip_gpu)
    if "tpu" in item.keywords and backend != "tpu":
      item.add_marker(skip_tpu)
