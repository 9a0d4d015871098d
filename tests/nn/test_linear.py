"""Linear: nnx.Linear's results, with a single row computed as a two-row matrix product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.linear import MIN_PADDED_WEIGHT, Linear


def _pair(k, n, seed=0):
  ours = Linear(k, n, use_bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  plain = nnx.Linear(k, n, use_bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
  return ours, plain


@pytest.mark.parametrize("shape", [(1, 1024), (3, 1024), (2, 5, 1024)])
def test_matches_nnx_linear(shape):
  ours, plain = _pair(1024, 1024)
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  got, want = ours(x), plain(x)
  assert got.shape == want.shape == (*shape[:-1], 1024)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _dot_operand_rows(layer, x) -> list[str]:
  text = jax.jit(lambda v: layer(v)).lower(x).as_text()
  return [line for line in text.splitlines() if "dot_general" in line]


def test_single_row_is_a_two_row_product_above_the_threshold():
  big = Linear(1024, 1024, rngs=nnx.Rngs(0))        # 2^20 >= MIN_PADDED_WEIGHT
  assert big.in_features * big.out_features >= MIN_PADDED_WEIGHT
  (dot,) = _dot_operand_rows(big, jnp.ones((1, 1024)))
  assert "tensor<2x1024x" in dot
  small = Linear(64, 64, rngs=nnx.Rngs(0))
  (dot,) = _dot_operand_rows(small, jnp.ones((1, 64)))
  assert "tensor<1x64x" in dot and "tensor<2x" not in dot


def test_gradients_match_nnx_linear():
  ours, plain = _pair(1024, 1024)
  x = jax.random.normal(jax.random.key(2), (1, 1024), jnp.float32)

  def loss(layer, v):
    return jnp.sum(jnp.sin(layer(v)))

  g_ours = nnx.grad(loss, argnums=(0, 1))(ours, x)
  g_plain = nnx.grad(loss, argnums=(0, 1))(plain, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
