"""Tests for the stable segment sum and the decay masks (mamba_jax/ops/segsum.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops import segsum
from tests.numerics import assert_close

# Norm-relative tolerances per dtype, against float64 numpy references.
RTOL = {jnp.float64: 1e-13, jnp.float32: 1e-6}

# Jitted once per shape: eager op-by-op dispatch is slow on small CPUs.
SEGSUM = jax.jit(segsum.segsum)
SEGSUM_BLOCKED = jax.jit(segsum.segsum_blocked, static_argnames="block")
FNS = {"segsum": SEGSUM, "segsum_blocked": SEGSUM_BLOCKED}


def _segsum_loops(a, ids=None):
  """Reference: out[i, j] = a[j+1] + ... + a[i] by explicit loops in float64."""
  t = a.shape[-1]
  out = np.full(a.shape + (t,), -np.inf)
  for index in np.ndindex(a.shape[:-1]):
    for i in range(t):
      for j in range(i + 1):
        if ids is None or ids[index][i] == ids[index][j]:
          out[index + (i, j)] = np.sum(np.asarray(a[index][j + 1:i + 1], np.float64))
  return out


@jax.jit
def _all_forms(a, ids):
  """Every function of segsum.py on one input, in one compilation."""
  return dict(
      segsum=segsum.segsum(a), segsum_ids=segsum.segsum(a, ids),
      blocked=segsum.segsum_blocked(a, block=2),
      blocked_ids=segsum.segsum_blocked(a, ids, block=2),
      mask=segsum.decay_mask(a), to_end=segsum.decay_to_end(a),
      to_end_ids=segsum.decay_to_end(a, ids), from_start=segsum.decay_from_start(a),
      from_start_ids=segsum.decay_from_start(a, ids, jnp.array(0, jnp.int32)))


def test_hand_computed():
  # a = [1, 2, 3]: out[i, j] = a[j+1] + ... + a[i]
  #   row 0: [0,      -inf, -inf]
  #   row 1: [2,      0,    -inf]      (a1)
  #   row 2: [2+3=5,  3,    0   ]      (a1+a2, a2)
  inf = np.inf
  expected = np.array([[0, -inf, -inf], [2, 0, -inf], [5, 3, 0]])
  # Segments [0, 0, 1]: position 2 starts a new segment, so row 2 keeps only its diagonal.
  expected_ids = np.array([[0, -inf, -inf], [2, 0, -inf], [-inf, -inf, 0]])
  got = _all_forms(jnp.array([1.0, 2.0, 3.0], jnp.float64), jnp.array([0, 0, 1], jnp.int32))
  np.testing.assert_array_equal(got["segsum"], expected)
  np.testing.assert_array_equal(got["blocked"], expected)
  np.testing.assert_array_equal(got["segsum_ids"], expected_ids)
  np.testing.assert_array_equal(got["blocked_ids"], expected_ids)
  # exp of it: L[2, 0] = exp(5) etc.; 0 above the diagonal.
  np.testing.assert_allclose(got["mask"], np.exp(expected), rtol=1e-15)
  # decay_to_end[j] = exp(a[j+1] + ... + a[2]) = exp([5, 3, 0]); decay_from_start = exp([1, 3, 6]).
  np.testing.assert_allclose(got["to_end"], np.exp([5.0, 3.0, 0.0]), rtol=1e-15)
  np.testing.assert_allclose(got["from_start"], np.exp([1.0, 3.0, 6.0]), rtol=1e-15)
  # With ids [0, 0, 1] and the incoming state in segment 0: only positions 0, 1 see it, and
  # only position 2 (the last one's segment) reaches the end.
  np.testing.assert_allclose(got["from_start_ids"], [np.exp(1.0), np.exp(3.0), 0.0], rtol=1e-15)
  np.testing.assert_allclose(got["to_end_ids"], [0.0, 0.0, 1.0], rtol=1e-15)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("t,block", [(1, 16), (7, 16), (37, 8), (64, 16)])
def test_matches_loops_and_naive_difference(dtype, t, block):
  rng = np.random.default_rng(t)
  a = -rng.uniform(0.0, 1.0, (2, 3, t))
  ids = np.sort(rng.integers(0, 3, (2, 1, t)), axis=-1).astype(np.int32)
  a_in = jnp.asarray(a, dtype)
  a64 = np.asarray(a_in, np.float64)  # the rounded inputs
  for got_fn in (SEGSUM, lambda x, i=None: SEGSUM_BLOCKED(x, i, block=block)):
    expected = np.exp(_segsum_loops(a64))
    assert_close(jnp.exp(got_fn(a_in)), expected, RTOL[dtype], "exp(segsum)")
    expected_ids = np.exp(_segsum_loops(a64, np.broadcast_to(ids, a.shape)))
    assert_close(jnp.exp(got_fn(a_in, jnp.asarray(ids))), expected_ids, RTOL[dtype],
                 "exp(segsum) with ids")
  # Where it is accurate (small sums, float64) the naive difference of cumsums agrees.
  cs = np.cumsum(a64, axis=-1)
  naive = np.where(np.tril(np.ones((t, t), bool)), cs[..., :, None] - cs[..., None, :], -np.inf)
  np.testing.assert_allclose(np.asarray(SEGSUM(a_in), np.float64), naive,
                             rtol=RTOL[dtype] * t, atol=RTOL[dtype] * t)


def test_stable_where_the_difference_is_not():
  # Huge early decays then tiny ones: cs is ~-1e4 where the true partial sums are ~-1e-3, so
  # the cumsum difference keeps only a few bits in float32; the stable sum is exact-ish.
  a = np.concatenate([np.full(8, -2000.0), np.full(8, -1e-3)]).astype(np.float32)
  got = np.asarray(SEGSUM_BLOCKED(jnp.asarray(a), block=4))
  # rows/cols 8..15: out[i, j] = -(i - j) * 1e-3
  want = -(np.arange(8)[:, None] - np.arange(8)[None, :]) * 1e-3
  tail = got[8:, 8:]
  lower = np.tril(np.ones((8, 8), bool))
  np.testing.assert_allclose(tail[lower], want[lower].astype(np.float32), rtol=1e-5, atol=1e-9)
  cs = np.cumsum(a)
  naive_tail = (cs[8:, None] - cs[None, 8:])[lower]
  assert np.max(np.abs(naive_tail - want[lower])) > 1e-4  # the difference form is off


@pytest.mark.parametrize("fn", ["segsum", "segsum_blocked"])
def test_no_nan_with_inf_inputs_large_sums_and_resets(fn):
  f = FNS[fn]
  # -inf log-decays (a decay of exactly 0), sums that overflow float32, and resets.
  a = jnp.array([-1.0, -jnp.inf, -3e38, -3e38, -2.0, -0.5, -jnp.inf, -1.0], jnp.float32)
  ids = jnp.array([0, 0, 0, 1, 1, 1, 2, 2], jnp.int32)
  for seg_ids in (None, ids):
    out = f(a, seg_ids)
    assert not np.any(np.isnan(np.asarray(out)))
    mask = np.asarray(jnp.exp(out))
    assert np.all(np.isfinite(mask)) and np.all((mask >= 0) & (mask <= 1))
    np.testing.assert_array_equal(np.diag(mask), np.ones(8))
  # Gradient of a loss through exp(segsum): finite, including through -inf entries and resets.
  a = jnp.array([-1.0, -40.0, -3e3, -0.5, -2.0, -0.25, -60.0, -1.0], jnp.float32)
  w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(w * jnp.exp(f(x, ids)))))(a)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("fn", ["segsum", "segsum_blocked"])
def test_gradient_matches_finite_differences(fn):
  f = FNS[fn]
  rng = np.random.default_rng(1)
  a = jnp.asarray(-rng.uniform(0.1, 1.0, 11), jnp.float64)
  ids = jnp.array([0] * 4 + [1] * 7, jnp.int32)
  w = jnp.asarray(rng.standard_normal((11, 11)))
  loss = jax.jit(lambda x: jnp.sum(w * jnp.exp(f(x, ids))))
  grad = np.asarray(jax.jit(jax.grad(loss))(a))
  # Central differences, all 2 x 11 shifted inputs in one batched call.
  eps = 1e-6
  shifts = eps * np.eye(11)
  values = np.asarray(jax.vmap(loss)(jnp.concatenate([a + shifts, a - shifts])))
  fd = (values[:11] - values[11:]) / (2 * eps)
  assert_close(grad, fd, 1e-8, "d loss / d a")
