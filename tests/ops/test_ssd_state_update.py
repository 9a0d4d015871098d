"""Tests for the SSD decode step (mamba_jax/ops/ssd_state_update.py).

The decoding invariant: stepping token by token from the same state gives the full forward's
outputs and final state, and prefix (full forward) + steps gives the full forward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import ssd
from mamba_jax.ops.ssd_state_update import ssd_state_update
from tests.numerics import assert_close

# Norm-relative tolerances against the float64 full forward, per activation dtype.
RTOL = {jnp.float64: 1e-12, jnp.bfloat16: 2e-2}

OPTIONS = dict(dt_softplus=True, dt_limit=(0.001, 0.3))


def _inputs(dtype, b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
  """Activations in ``dtype``; parameters and the state in float32 unless float64."""
  rng = np.random.default_rng(seed)
  param = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return dict(
      x=jnp.asarray(rng.standard_normal((b, l, h, p)), dtype),
      dt=jnp.asarray(rng.normal(-2.0, 1.0, (b, l, h)), dtype),
      A=jnp.asarray(-rng.uniform(0.05, 1.5, h), param),
      B=jnp.asarray(rng.standard_normal((b, l, g, n)), dtype),
      C=jnp.asarray(rng.standard_normal((b, l, g, n)), dtype),
      D=jnp.asarray(rng.standard_normal((h, p)), param),
      z=jnp.asarray(rng.standard_normal((b, l, h, p)), dtype),
      dt_bias=jnp.asarray(rng.uniform(-0.5, 0.5, h), param),
      initial_states=jnp.asarray(rng.standard_normal((b, h, p, n)), param),
  )


@jax.jit
def _decode(state, x, dt, A, B, C, D, z, dt_bias):
  """Loops ssd_state_update over the length (axis 1) with lax.scan."""

  def step(state, token):
    x_t, dt_t, B_t, C_t, z_t = token
    y_t, state = ssd_state_update(state, x_t, dt_t, A, B_t, C_t, D=D, z=z_t, dt_bias=dt_bias,
                                  **OPTIONS)
    return state, y_t

  tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C, z))
  state, ys = jax.lax.scan(step, state, tokens)
  return jnp.moveaxis(ys, 0, 1), state


_full = jax.jit(functools.partial(ssd, chunk_size=16, return_final_states=True, **OPTIONS))


def _full_forward(inputs, initial_states):
  kwargs = {k: v for k, v in inputs.items() if k not in ("x", "dt", "A", "B", "C")}
  kwargs["initial_states"] = initial_states
  return _full(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], **kwargs)


def _step_args(inputs, lo, hi):
  return (inputs["x"][:, lo:hi], inputs["dt"][:, lo:hi], inputs["A"], inputs["B"][:, lo:hi],
          inputs["C"][:, lo:hi], inputs["D"], inputs["z"][:, lo:hi], inputs["dt_bias"])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16], ids=["f64", "bf16"])
def test_steps_equal_full_forward(dtype):
  inputs = _inputs(dtype)
  as64 = {k: jnp.asarray(v, jnp.float64) for k, v in inputs.items()}
  y_ref, final_ref = _full_forward(as64, as64["initial_states"])  # float64 oracle
  y, final = _decode(inputs["initial_states"], *_step_args(inputs, 0, 37))
  assert y.dtype == dtype and final.dtype == inputs["initial_states"].dtype
  assert_close(y, y_ref, RTOL[dtype], "decoded y")
  assert_close(final, final_ref, 1e-12 if dtype == jnp.float64 else 1e-5, "decoded state")


def test_prefix_then_steps_equal_full_forward():
  inputs = {k: jnp.asarray(v, jnp.float64) for k, v in _inputs(jnp.float32, seed=1).items()}
  y_ref, final_ref = _full_forward(inputs, inputs["initial_states"])
  prefix = {k: (v[:, :20] if v.ndim >= 3 and k != "initial_states" else v)
            for k, v in inputs.items()}
  y_prefix, state = _full_forward(prefix, inputs["initial_states"])
  y_rest, final = _decode(state, *_step_args(inputs, 20, 37))
  assert_close(jnp.concatenate([y_prefix, y_rest], axis=1), y_ref, 1e-12, "prefix + steps y")
  assert_close(final, final_ref, 1e-12, "prefix + steps state")


def test_hand_computed_step():
  # One head, head_dim 1, d_state 2: dt = 0.5 + dt_bias 0.5 = 1, A = -ln 2 -> decay 1/2.
  # h' = 1/2 · [2, 4] + 1 · x · B = [1, 2] + 3 · [1, -1] = [4, -1];
  # y = h' · C + D x = (4 · 1 + (-1) · 2) + 2 · 3 = 8.
  f64 = jnp.float64
  y, state = ssd_state_update(
      jnp.array([[[[2.0, 4.0]]]], f64), jnp.array([[[3.0]]], f64), jnp.array([[0.5]], f64),
      jnp.array([-np.log(2.0)], f64), jnp.array([[[1.0, -1.0]]], f64),
      jnp.array([[[1.0, 2.0]]], f64), D=jnp.array([2.0], f64), dt_bias=jnp.array([0.5], f64))
  np.testing.assert_allclose(state[0, 0, 0], [4.0, -1.0], rtol=1e-15)
  np.testing.assert_allclose(y[0, 0, 0], 8.0, rtol=1e-15)


def _valid_step_args():
  b, h, p, g, n = 2, 4, 3, 2, 5
  return dict(state=jnp.zeros((b, h, p, n)), x=jnp.zeros((b, h, p)), dt=jnp.ones((b, h)),
              A=-jnp.ones(h), B=jnp.zeros((b, g, n)), C=jnp.zeros((b, g, n)))


BAD_INPUTS = {
    "x rank": (dict(x=jnp.zeros((2, 12))), "x must have shape"),
    "state shape": (dict(state=jnp.zeros((2, 4, 3, 6))), "state must have shape"),
    "dt shape": (dict(dt=jnp.ones((2, 3))), "dt must have shape"),
    "A positive": (dict(A=jnp.ones(4)), "A must be negative"),
    "B shape": (dict(B=jnp.zeros((1, 2, 5))), "B must have shape"),
    "C shape": (dict(C=jnp.zeros((2, 1, 5))), "C must have shape"),
    "groups": (dict(B=jnp.zeros((2, 3, 5)), C=jnp.zeros((2, 3, 5))), "groups"),
    "D shape": (dict(D=jnp.ones((4, 2))), "D must have shape"),
    "z shape": (dict(z=jnp.zeros((2, 4))), "z must have shape"),
    "dt_bias shape": (dict(dt_bias=jnp.zeros(3)), "dt_bias must have shape"),
    "dt_limit": (dict(dt_limit=(0.5,)), "dt_limit"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
  change, message = BAD_INPUTS[name]
  args = _valid_step_args()
  args.update(change)
  with pytest.raises(ValueError, match=message):
    ssd_state_update(**args)
