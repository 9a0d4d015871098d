"""The lazily exported top-level API resolves to the implementing functions."""

import importlib

import pytest

import mamba_jax


@pytest.mark.parametrize("name", mamba_jax.__all__)
def test_export_is_the_implementation(name):
  module = importlib.import_module(mamba_jax._EXPORTS[name])
  assert getattr(mamba_jax, name) is getattr(module, name)


def test_unknown_attribute_raises():
  with pytest.raises(AttributeError, match="no_such_thing"):
    mamba_jax.no_such_thing  # noqa: B018
