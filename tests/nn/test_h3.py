"""Tests of the H3 and no-gate SSM mixers: forward and gradients against re-derivations from
their parameters, prefill + steps against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.h3 import H3Mixer, SSMNoGate
from mamba_jax.ops.selective_scan import selective_scan
from tests.nn.test_mamba1 import conv_reference, pure, reference
from tests.numerics import assert_close

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
D_MODEL, D_STATE = 8, 4


def h3_reference(p, u, m: H3Mixer):
  """H3 (Fu et al., 2023, §3.1) from the parameter dict p, in float64, sequential scan."""
  u = u.astype(jnp.float64)
  p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  q, k, v = jnp.split(u @ p["in_proj"]["kernel"], 3, axis=-1)
  s = conv_reference(k, p["conv1d"]["kernel"], p["conv1d"].get("bias")) * v
  n = m.d_state
  if m.selective:  # S6: Δ, B, C from s
    cols = s @ p["x_proj"]["kernel"]
    r = m.dt_rank
    delta, bias = cols[..., :r] @ p["dt_proj"]["kernel"], p["dt_proj"]["bias"]
    B, C = cols[..., r:r + n], cols[..., r + n:]
  else:  # S4D: parameters broadcast over batch and length
    delta, bias = jnp.zeros_like(s), p["dt_bias"]
    B, C = (jnp.broadcast_to(p[name], (*s.shape[:-1], n)) for name in ("B", "C"))
  y = selective_scan(s, delta, -jnp.exp(p["A_log"]), B, C, D=p["D"], delta_bias=bias,
                     delta_softplus=True, impl="sequential")
  return (q * y) @ p["out_proj"]["kernel"]


def make(cls, dtype=jnp.float64, seed=0, **kwargs):
  return cls(D_MODEL, d_state=D_STATE, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed),
             **kwargs)


@pytest.mark.parametrize("ssm_kind", [pytest.param("s4d", marks=pytest.mark.slow), "s6"])
def test_h3_forward_and_vjp_match_reference(ssm_kind):
  m = make(H3Mixer, ssm_kind=ssm_kind)
  assert m.in_proj.kernel.shape == (D_MODEL, 3 * D_MODEL) and m.conv1d.bias is None
  rng = np.random.default_rng(2)
  u = jnp.asarray(rng.standard_normal((2, 7, D_MODEL)))
  params, f = pure(m)
  y, vjp = jax.vjp(jax.jit(f), params, u)
  y_ref, vjp_ref = jax.vjp(jax.jit(lambda p, u: h3_reference(p, u, m)), params, u)
  assert_close(y, y_ref, TOL[jnp.float64], f"H3/{ssm_kind} forward")
  ct = jnp.asarray(rng.standard_normal(y.shape))
  for (path, g), (_, g_ref) in zip(jax.tree_util.tree_flatten_with_path(vjp(ct))[0],
                                   jax.tree_util.tree_flatten_with_path(vjp_ref(ct))[0]):
    name = f"H3/{ssm_kind} grad {jax.tree_util.keystr(path)}"
    assert_close(g, g_ref, TOL[jnp.float64], name)
    assert np.any(np.asarray(g) != 0), f"zero gradient: {name}"


def test_no_gate_forward_matches_reference_float32():
  m = make(SSMNoGate, jnp.float32, seed=1, ssm_kind="s4d")
  assert m.in_proj.kernel.shape == (D_MODEL, m.d_inner)  # no z columns
  u = jnp.asarray(np.random.default_rng(1).standard_normal((1, 13, D_MODEL)), jnp.float32)
  params, _ = pure(m)
  assert_close(jax.jit(m)(u), reference(params, u, m, gated=False), TOL[jnp.float32],
               "SSMNoGate forward")


@pytest.mark.parametrize("cls", [H3Mixer, pytest.param(SSMNoGate, marks=pytest.mark.slow)])
def test_prefill_then_steps_equal_full_forward(cls):
  m = make(cls, seed=3, ssm_kind="s6")
  u = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, D_MODEL)))
  y_full, state_full = m(u, return_state=True)
  y_pre, state = m(u[:, :2], return_state=True)
  ys = [y_pre]
  for t in range(2, u.shape[1]):
    y_t, state = m.step(u[:, t], state)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), y_full, TOL[jnp.float64], f"{cls.__name__} steps")
  assert_close(state.ssm_state, state_full.ssm_state, TOL[jnp.float64], "ssm state")


def test_h3_validation():
  with pytest.raises(ValueError, match="shift_width"):
    make(H3Mixer, shift_width=0)
  with pytest.raises(ValueError, match="seq_idx"):
    make(H3Mixer)(jnp.zeros((1, 3, D_MODEL)), seq_idx=jnp.zeros((1, 3), jnp.int32))
