"""Tests for mamba_jax.ops.causal_conv1d against a plain float64 numpy loop over t and k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from tests.numerics import assert_close

# Norm-relative tolerances, forward and gradients, against the float64 reference evaluated on
# the same (rounded) inputs.
TOLS = {jnp.float64: 1e-12, jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def _silu(p):
  return p / (1 + np.exp(-p))


def _silu_grad(p):
  s = 1 / (1 + np.exp(-p))
  return s * (1 + p * (1 - s))


def conv_reference(x, weight, bias, activation, init, seq_idx, gy=None, gfinal=None):
  """float64 loops: y[t] = act(bias + sum_k weight[:, k] x[t - (w-1) + k]) and its adjoint.

  Positions before 0 read ``init`` and belong to sequence 0; an input counts only when its
  sequence id equals that of the output position. Returns (y, final) and, when the
  cotangents gy, gfinal are given, also the gradients {x, weight, bias, init}.
  """
  f64 = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float64))
  x, weight, bias, init, gy, gfinal = map(f64, (x, weight, bias, init, gy, gfinal))
  b, l, d = x.shape
  w = weight.shape[1]
  init = np.zeros((b, d, w - 1)) if init is None else init
  seq = np.zeros((b, l), np.int64) if seq_idx is None else np.asarray(seq_idx)

  def source(i, s):
    """(value (d,), seq id, ('x' | 'init', index)) of the input at position s of row i."""
    if s >= 0:
      return x[i, s], seq[i, s], ("x", s)
    return init[i, :, w - 1 + s], 0, ("init", w - 1 + s)

  pre = np.zeros((b, l, d)) + (0 if bias is None else bias)
  for i in range(b):
    for t in range(l):
      for k in range(w):
        value, sid, _ = source(i, t - (w - 1) + k)
        if sid == seq[i, t]:
          pre[i, t] += weight[:, k] * value
  y = pre if activation is None else _silu(pre)
  final = np.zeros((b, d, w - 1))
  for i in range(b):
    for j in range(w - 1):
      value, sid, _ = source(i, l - (w - 1) + j)
      if sid == seq[i, -1]:
        final[i, :, j] = value
  if gy is None:
    return y, final

  gpre = gy if activation is None else gy * _silu_grad(pre)
  grads = {"x": np.zeros_like(x), "weight": np.zeros_like(weight),
           "bias": gpre.sum((0, 1)), "init": np.zeros_like(init)}

  def add_to_source(i, where, g):
    kind, idx = where
    if kind == "x":
      grads["x"][i, idx] += g
    else:
      grads["init"][i, :, idx] += g

  for i in range(b):
    for t in range(l):
      for k in range(w):
        value, sid, where = source(i, t - (w - 1) + k)
        if sid == seq[i, t]:
          add_to_source(i, where, weight[:, k] * gpre[i, t])
          grads["weight"][:, k] += value * gpre[i, t]
    if gfinal is not None:
      for j in range(w - 1):
        _, sid, where = source(i, l - (w - 1) + j)
        if sid == seq[i, -1]:
          add_to_source(i, where, gfinal[i, :, j])
  return y, final, grads


def _inputs(rng, batch, length, dim, width, dtype, bias, init):
  r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return {"x": r(batch, length, dim), "weight": r(dim, width),
          "bias": r(dim) if bias else None, "init": r(batch, dim, width - 1) if init else None}


def _seq_idx(rng, batch, length):
  """Nondecreasing ids with random segment breaks; row 0 starts at id 0, row 1 at id 1."""
  starts = np.arange(batch)[:, None] % 2
  return jnp.asarray(starts + np.cumsum(rng.random((batch, length)) < 0.15, axis=1), jnp.int32)


def _check_against_reference(rng, dtype, width, length, bias, activation, init, seq, final,
                             batch=2, dim=3):
  inputs = _inputs(rng, batch, length, dim, width, dtype, bias, init)
  seq_idx = _seq_idx(rng, batch, length) if seq else None
  diff = {k: v for k, v in inputs.items() if v is not None}

  def f(p):
    return causal_conv1d(p["x"], p["weight"], p.get("bias"), activation, p.get("init"),
                         seq_idx, return_final_states=final)

  out, vjp = jax.vjp(f, diff)
  y, fin = out if final else (out, None)
  gy = jnp.asarray(rng.standard_normal(y.shape), dtype)
  gfinal = jnp.asarray(rng.standard_normal(fin.shape), dtype) if final else None
  (grads,) = vjp((gy, gfinal) if final else gy)

  y_ref, fin_ref, grads_ref = conv_reference(
      inputs["x"], inputs["weight"], inputs["bias"], activation, inputs["init"], seq_idx,
      gy, gfinal)
  tol = TOLS[dtype]
  assert y.dtype == dtype and y.shape == (batch, length, dim)
  assert_close(y, y_ref, tol, "y")
  if final:
    assert fin.dtype == dtype and fin.shape == (batch, dim, width - 1)
    assert_close(fin, fin_ref, tol, "final_states")
  for name, g in grads.items():
    assert g.dtype == dtype
    assert_close(g, grads_ref[name], tol, f"d{name}")


CONFIGS = {  # name: (bias, activation, initial_states, seq_idx, return_final_states)
    "plain": (False, None, False, False, False),
    "bias_silu": (True, "silu", False, False, True),
    "initial_states": (False, "swish", True, False, True),
    "seq_idx": (True, None, False, True, False),
    "everything": (True, "silu", True, True, True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 3, 63])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_matches_reference_float64(width, length, config):
  rng = np.random.default_rng([width, length, list(CONFIGS).index(config)])
  _check_against_reference(rng, jnp.float64, width, length, *CONFIGS[config])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("width,length", [(2, 63), (4, 3), (4, 63)])
def test_matches_reference_low_precision(dtype, width, length):
  rng = np.random.default_rng([width, length, 7])
  _check_against_reference(rng, dtype, width, length, *CONFIGS["everything"])


def test_batch_one_long_odd_length():
  rng = np.random.default_rng(11)
  _check_against_reference(rng, jnp.float32, 4, 257, *CONFIGS["everything"], batch=1, dim=5)


def test_hand_computed():
  # dim 1, width 2: y[t] = bias + weight[0] * x[t - 1] + weight[1] * x[t], x[-1] = initial.
  x = jnp.array([[[1.0], [2.0], [3.0]]], jnp.float64)  # (b=1, l=3, e=1)
  weight = jnp.array([[0.5, 2.0]], jnp.float64)
  bias = jnp.array([1.0], jnp.float64)
  init = jnp.array([[[4.0]]], jnp.float64)
  y, final = causal_conv1d(x, weight, bias, initial_states=init, return_final_states=True)
  # y0 = 1 + 0.5*4 + 2*1 = 5;  y1 = 1 + 0.5*1 + 2*2 = 5.5;  y2 = 1 + 0.5*2 + 2*3 = 8.
  np.testing.assert_allclose(y[0, :, 0], [5.0, 5.5, 8.0], rtol=1e-15)
  np.testing.assert_allclose(final, [[[3.0]]])  # the last width - 1 = 1 input
  # Without the initial state x[-1] = 0:  y0 = 1 + 2*1 = 3.
  y = causal_conv1d(x, weight, bias)
  np.testing.assert_allclose(y[0, :, 0], [3.0, 5.5, 8.0], rtol=1e-15)
  # seq_idx [0, 1, 1]: the initial state (sequence 0) feeds y0; x0 does not feed y1:
  # y0 = 5;  y1 = 1 + 2*2 = 5;  y2 = 8.
  y = causal_conv1d(x, weight, bias, initial_states=init,
                    seq_idx=jnp.array([[0, 1, 1]], jnp.int32))
  np.testing.assert_allclose(y[0, :, 0], [5.0, 5.0, 8.0], rtol=1e-15)
  # seq_idx [1, 1, 1]: the first segment is not sequence 0, so the initial state is unused.
  y = causal_conv1d(x, weight, bias, initial_states=init,
                    seq_idx=jnp.array([[1, 1, 1]], jnp.int32))
  np.testing.assert_allclose(y[0, :, 0], [3.0, 5.5, 8.0], rtol=1e-15)


@pytest.mark.parametrize("width", [2, 4])
def test_seq_idx_equals_separate_segments(width):
  rng = np.random.default_rng(width)
  dim, bounds = 3, [0, 5, 6, 20, 33]  # segments of lengths 5, 1, 14, 13
  x = jnp.asarray(rng.standard_normal((1, bounds[-1], dim)))
  weight, bias = jnp.asarray(rng.standard_normal((dim, width))), jnp.asarray(
      rng.standard_normal(dim))
  seq_idx = jnp.asarray(np.repeat(np.arange(4), np.diff(bounds))[None], jnp.int32)
  y, final = causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx, return_final_states=True)
  parts = [causal_conv1d(x[:, a:b], weight, bias, "silu", return_final_states=True)
           for a, b in zip(bounds[:-1], bounds[1:])]
  assert_close(y, jnp.concatenate([p[0] for p in parts], axis=1), 1e-14, "y")
  assert_close(final, parts[-1][1], 1e-14, "final_states of the last segment")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("extra", [0, 1])  # state_len = width - 1 + extra
@pytest.mark.parametrize("width,length", [(1, 3), (2, 1), (4, 2), (4, 9)])
def test_token_by_token_matches_full(width, length, extra, dtype):
  rng = np.random.default_rng([width, length, extra])
  batch, dim, state_len = 2, 3, width - 1 + extra
  r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  x, weight, bias, state0 = r(batch, length, dim), r(dim, width), r(dim), r(batch, dim, state_len)
  init = state0[:, :, state_len - (width - 1):]
  y_full, final = causal_conv1d(x, weight, bias, "silu", initial_states=init,
                                return_final_states=True)
  ys, state = [], state0
  for t in range(length):
    y_t, state = causal_conv1d_update(x[:, t], state, weight, bias, "silu")
    assert y_t.dtype == dtype and state.dtype == dtype and state.shape == (batch, dim, state_len)
    ys.append(y_t)
  assert_close(jnp.stack(ys, axis=1), y_full, TOLS[dtype], "stepped y")
  assert_close(state[:, :, state_len - (width - 1):], final, 0.0, "stepped final state")
  # The whole state holds the last state_len inputs of [starting state, x], oldest first.
  history = np.concatenate([state0, np.swapaxes(x, 1, 2)], axis=2)
  np.testing.assert_array_equal(state, history[:, :, history.shape[2] - state_len:])


def test_update_matches_reference_step():
  rng = np.random.default_rng(3)
  batch, dim, width = 2, 5, 4
  x, weight, bias = (jnp.asarray(rng.standard_normal(s)) for s in ((batch, dim), (dim, width),
                                                                  (dim,)))
  state = jnp.asarray(rng.standard_normal((batch, dim, width + 2)))
  y, new_state = causal_conv1d_update(x, state, weight, bias)
  s = np.asarray(state)
  expected = np.asarray(bias) + np.einsum("bdk,dk->bd", s[:, :, 3:], np.asarray(weight)[:, :3]) \
      + np.asarray(weight)[:, 3] * np.asarray(x)
  assert_close(y, expected, 1e-14, "y")
  np.testing.assert_array_equal(new_state[:, :, :-1], s[:, :, 1:])
  np.testing.assert_array_equal(new_state[:, :, -1], x)


def test_final_states_shorter_than_width():
  # length 1 < width - 1 = 3: the final state reaches back into the initial state.
  init = jnp.arange(1.0, 7.0).reshape(1, 2, 3)  # (b=1, e=2, w-1=3)
  x = jnp.array([[[10.0, 20.0]]])  # (b=1, l=1, e=2)
  _, final = causal_conv1d(x, jnp.ones((2, 4)), initial_states=init, return_final_states=True)
  np.testing.assert_array_equal(final, [[[2.0, 3.0, 10.0], [5.0, 6.0, 20.0]]])


F32 = jnp.float32
BAD_CONV = [
    (lambda: causal_conv1d(jnp.zeros((2, 5), F32), jnp.zeros((3, 4), F32)), "x must have shape"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((4, 4), F32)), "weight"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3,), F32)), "weight"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 0), F32)), "width >= 1"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 4), F32), jnp.zeros(4, F32)),
     "bias"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 4), F32), activation="relu"),
     "activation"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 4), F32),
                           initial_states=jnp.zeros((2, 3, 4), F32)), "initial_states"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 4), F32),
                           seq_idx=jnp.zeros((2, 5), F32)), "seq_idx must have an integer"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), F32), jnp.zeros((3, 4), F32),
                           seq_idx=jnp.zeros((2, 4), jnp.int32)), "seq_idx must have shape"),
    (lambda: causal_conv1d(jnp.zeros((1, 3, 3), F32), jnp.zeros((3, 4), F32),
                           seq_idx=jnp.array([[0, 1, 0]], jnp.int32)), "nondecreasing"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), jnp.int32), jnp.zeros((3, 4), F32)), "x must have"),
    (lambda: causal_conv1d_update(jnp.zeros((2, 3), F32), jnp.zeros((2, 3, 2), F32),
                                  jnp.zeros((3, 4), F32)), "state_len >= width - 1"),
    (lambda: causal_conv1d_update(jnp.zeros((2, 3), F32), jnp.zeros((2, 4, 3), F32),
                                  jnp.zeros((3, 4), F32)), "conv_state must have shape"),
    (lambda: causal_conv1d_update(jnp.zeros((2, 3, 1), F32), jnp.zeros((2, 3, 3), F32),
                                  jnp.zeros((3, 4), F32)), "x must have shape"),
    (lambda: causal_conv1d_update(jnp.zeros((2, 3), F32), jnp.zeros((2, 3, 3), F32),
                                  jnp.zeros((3, 4), F32), activation="gelu"), "activation"),
]


@pytest.mark.parametrize("call,match", BAD_CONV)
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_under_jit_with_mixed_dtypes():
  # bf16 activations with float32 parameters (mixed precision) under jit, seq_idx traced.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 63, 3)), jnp.bfloat16)
  weight, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4), (3,)))
  init = jnp.asarray(rng.standard_normal((2, 3, 3)), jnp.float32)
  seq_idx = _seq_idx(rng, 2, 63)
  fn = jax.jit(lambda *a: causal_conv1d(*a[:3], "silu", *a[3:], return_final_states=True))
  y, final = fn(x, weight, bias, init, seq_idx)
  assert y.dtype == jnp.bfloat16 and final.dtype == jnp.bfloat16
  y_ref, final_ref = conv_reference(x, weight, bias, "silu", init, seq_idx)
  assert_close(y, y_ref, TOLS[jnp.bfloat16], "y")
  assert_close(final, final_ref.astype(jnp.bfloat16), 0.0, "final_states")


def test_seq_idx_closed_over_under_jit():
  # A concrete seq_idx captured by a jitted function is still checked and used correctly.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((1, 9, 2)))
  weight = jnp.asarray(rng.standard_normal((2, 3)))
  seq_idx = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]], jnp.int32)
  y = jax.jit(lambda x, w: causal_conv1d(x, w, seq_idx=seq_idx))(x, weight)
  y_ref, _ = conv_reference(x, weight, None, None, None, seq_idx)
  assert_close(y, y_ref, TOLS[jnp.float64], "y")
  bad = jnp.array([[0, 1, 0, 1, 1, 2, 2, 2, 2]], jnp.int32)
  with pytest.raises(ValueError, match="nondecreasing"):
    jax.jit(lambda x, w: causal_conv1d(x, w, seq_idx=bad))(x, weight)
