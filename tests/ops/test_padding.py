"""ops.padding: left_align's permutation and the conv that keeps pads out of token windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.causal_conv1d import causal_conv1d
from mamba_jax.ops.padding import (causal_conv1d_after_pads, check_token_mask, left_align,
                                   take_along_length)
from tests.numerics import assert_close


def test_left_align_moves_tokens_to_the_end_in_order():
  mask = jnp.asarray([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  x = jnp.arange(20).reshape(4, 5)
  order, inverse, num_pads = left_align(mask)
  aligned = np.asarray(take_along_length(x, order))
  # Row 0: pads (positions 1, 4) first, then tokens 0, 2, 3 in order.
  np.testing.assert_array_equal(aligned[0], [1, 4, 0, 2, 3])
  np.testing.assert_array_equal(aligned[1], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(num_pads, [2, 2, 0, 5])
  np.testing.assert_array_equal(take_along_length(jnp.asarray(aligned), inverse), x)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_after_pads_equals_each_row_alone(activation):
  """Row r: num_pads[r] pads (garbage) then tokens; output at tokens and final state equal
  the conv of the tokens alone from the same initial state."""
  key = jax.random.split(jax.random.key(0), 4)
  b, l, c, w = 4, 7, 3, 4
  x = jax.random.normal(key[0], (b, l, c), jnp.float64)
  weight = jax.random.normal(key[1], (c, w), jnp.float64)
  bias = jax.random.normal(key[2], (c,), jnp.float64)
  init = jax.random.normal(key[3], (b, c, w - 1), jnp.float64)
  num_pads = jnp.asarray([0, 2, 5, 7])  # row 2 has 2 tokens (< w - 1); row 3 none
  y, final = causal_conv1d_after_pads(x, weight, bias, num_pads, activation=activation,
                                      initial_states=init, return_final_states=True)
  for r in range(b):
    p = int(num_pads[r])
    if p == l:  # no token: the state is the history, untouched
      np.testing.assert_array_equal(final[r], init[r])
      continue
    y_r, final_r = causal_conv1d(x[r:r + 1, p:], weight, bias, activation=activation,
                                 initial_states=init[r:r + 1], return_final_states=True)
    assert_close(y[r, p:], y_r[0], 1e-12, f"row {r} outputs")
    assert_close(final[r], final_r[0], 1e-12, f"row {r} final state")


def test_check_token_mask_rejects_bad_masks():
  with pytest.raises(ValueError, match="shape"):
    check_token_mask("mask", jnp.ones((2, 3)), 2, 4)
  with pytest.raises(ValueError, match="bool or integer"):
    check_token_mask("mask", jnp.ones((2, 4)), 2, 4)
  with pytest.raises(ValueError, match="only 0"):
    check_token_mask("mask", jnp.full((2, 4), 3), 2, 4)
  check_token_mask("mask", jnp.ones((2, 4), bool), 2, 4)
