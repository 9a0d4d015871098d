"""Tests of Mamba1Mixer: forward and gradients against a re-derivation from its parameters,
prefill + steps against the full forward, the ablations, initialisation, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.mamba1 import Mamba1Mixer, Mamba1State
from mamba_jax.ops.selective_scan import selective_scan
from tests.numerics import assert_close, relative_error

# Norm-relative tolerances of the module against the float64 re-derivation.
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
D_MODEL, D_STATE = 8, 4

VARIANTS = {
    "s6": {},
    "s4d_lin_complex_lti": dict(A_init="s4d_lin", ssm_kind="s4d"),
    # complex A, selective Δ and C (interleaved complex columns), parameter B (+ B_imag),
    # biases on the projections, no conv bias, constant dt_proj init, explicit dt_rank
    "mixed": dict(A_init="s4d_lin", selective=("delta", "C"), bias=True, conv_bias=False,
                  dt_init="constant", dt_rank=3),
}


def make(dtype=jnp.float64, seed=0, **kwargs) -> Mamba1Mixer:
  kwargs = {"d_state": D_STATE, **kwargs}
  return Mamba1Mixer(D_MODEL, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed), **kwargs)


def conv_reference(x, w, b):
  """y[t, c] = b[c] + Σ_k w[c, k] x[t − (w − 1) + k, c], zero history: the definition."""
  width, length = w.shape[1], x.shape[1]
  xp = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  y = sum(xp[:, k:k + length, :] * w[:, k] for k in range(width))
  return y if b is None else y + b


def reference(p, u, m: Mamba1Mixer, gated: bool = True):
  """Mamba §3.4 block from the parameter dict p, in float64, with the sequential scan."""
  u = u.astype(jnp.float64)
  p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  xz = u @ p["in_proj"]["kernel"] + p["in_proj"].get("bias", 0.0)
  # The interleaved in_proj layout: column 2c is x channel c, 2c + 1 is z channel c.
  x, z = (xz[..., 0::2], xz[..., 1::2]) if gated else (xz, None)
  x = jax.nn.silu(conv_reference(x, p["conv1d"]["kernel"], p["conv1d"].get("bias")))
  n, r = m.d_state, m.dt_rank
  cols = x @ p["x_proj"]["kernel"] if "x_proj" in p else None

  def complexify(c):  # interleaved (re, im) columns -> complex
    return c[..., 0::2] + 1j * c[..., 1::2] if m.is_complex else c

  def param(name):
    v = p[name] + (1j * p[name + "_imag"] if m.is_complex else 0)
    return jnp.broadcast_to(v, (*x.shape[:-1], n))

  off, nbc = 0, 2 * n if m.is_complex else n
  if "delta" in m.selective:
    delta, bias, off = cols[..., :r] @ p["dt_proj"]["kernel"], p["dt_proj"]["bias"], r
  else:
    delta, bias = jnp.zeros_like(x), p["dt_bias"]
  if "B" in m.selective:
    B, off = complexify(cols[..., off:off + nbc]), off + nbc
  else:
    B = param("B")
  C = complexify(cols[..., off:off + nbc]) if "C" in m.selective else param("C")
  A = -jnp.exp(p["A_log"]) + (1j * p["A_imag"] if m.is_complex else 0)
  y = selective_scan(x, delta, A, B, C, D=p["D"], z=z, delta_bias=bias, delta_softplus=True,
                     impl="sequential")
  return y @ p["out_proj"]["kernel"] + p["out_proj"].get("bias", 0.0)


def pure(m):
  """(params as a plain dict, f(params, u) -> the module's output with those params)."""
  graphdef, state = nnx.split(m)

  def f(params, u):
    s = nnx.split(m)[1]
    nnx.replace_by_pure_dict(s, params)
    return nnx.merge(graphdef, s)(u)

  return nnx.to_pure_dict(state), f


@pytest.mark.parametrize("variant", ["s6", "mixed"])
def test_forward_and_vjp_match_reference_float64(variant):
  """Output and every gradient equal the re-derivation's; every gradient is non-zero."""
  m = make(**VARIANTS[variant])
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.standard_normal((2, 9, D_MODEL)))
  params, f = pure(m)
  y, vjp = jax.vjp(jax.jit(f), params, u)
  y_ref, vjp_ref = jax.vjp(jax.jit(lambda p, u: reference(p, u, m)), params, u)
  assert_close(y, y_ref, TOL[jnp.float64], f"{variant} forward")
  ct = jnp.asarray(rng.standard_normal(y.shape))
  grads, grads_ref = vjp(ct), vjp_ref(ct)
  for (path, g), (_, g_ref) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                   jax.tree_util.tree_flatten_with_path(grads_ref)[0]):
    name = f"{variant} grad {jax.tree_util.keystr(path)}"
    assert_close(g, g_ref, TOL[jnp.float64], name)
    assert np.any(np.asarray(g) != 0), f"zero gradient: {name}"


@pytest.mark.parametrize("variant", ["s4d_lin_complex_lti"])
def test_forward_matches_reference_float32_batch_one_odd_length(variant):
  m = make(jnp.float32, seed=3, **VARIANTS[variant])
  u = jnp.asarray(np.random.default_rng(3).standard_normal((1, 63, D_MODEL)), jnp.float32)
  params, _ = pure(m)
  assert_close(jax.jit(m)(u), reference(params, u, m), TOL[jnp.float32], variant)


def test_bf16_forward_close_to_float64_oracle():
  m = make(jnp.bfloat16, seed=4)  # bf16 compute and parameters (A_log, D stay float32)
  u = jnp.asarray(np.random.default_rng(4).standard_normal((2, 33, D_MODEL)), jnp.bfloat16)
  params, _ = pure(m)
  y = jax.jit(m)(u)
  assert y.dtype == jnp.bfloat16
  assert_close(y, reference(params, u, m), TOL[jnp.bfloat16], "bf16 forward")


@pytest.mark.parametrize("variant", ["s6", pytest.param("mixed", marks=pytest.mark.slow)])
def test_prefill_then_steps_equal_full_forward(variant):
  m = make(**VARIANTS[variant], seed=5)
  u = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, D_MODEL)))
  y_full, state_full = m(u, return_state=True)
  y_pre, state = m(u[:, :1], return_state=True)  # a prefix shorter than the conv width
  ys = [y_pre]
  for t in range(1, u.shape[1]):
    y_t, state = m.step(u[:, t], state)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), y_full, TOL[jnp.float64], "prefill + steps")
  assert_close(state.ssm_state, state_full.ssm_state, TOL[jnp.float64], "ssm state")
  assert_close(state.conv_state, state_full.conv_state, TOL[jnp.float64], "conv state")
  y0, _ = m.step(u[:, 0], m.init_state(2, jnp.float64))  # from the empty state
  assert_close(y0, y_full[:, 0], TOL[jnp.float64], "first step")
  y_rest = m(u[:, 3:], initial_state=m(u[:, :3], return_state=True)[1])
  assert_close(y_rest, y_full[:, 3:], TOL[jnp.float64], "initial_state continuation")


def test_s4d_ssm_inputs_do_not_depend_on_the_input():
  m = make(ssm_kind="s4d", seed=6)
  assert m.x_proj is None and m.dt_proj is None
  rng = np.random.default_rng(6)
  x1, x2 = (jnp.asarray(rng.standard_normal((2, 5, m.d_inner))) for _ in range(2))
  for a, b in zip(m.ssm_inputs(x1), m.ssm_inputs(x2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  delta, bias, B, C = m.ssm_inputs(x1)
  np.testing.assert_array_equal(np.asarray(delta), 0.0)  # Δ = softplus(dt_bias) everywhere
  np.testing.assert_array_equal(np.asarray(bias), np.asarray(m.dt_bias[...]))
  np.testing.assert_array_equal(np.asarray(B), np.broadcast_to(m.B[...], B.shape))


def test_selective_subset_only_the_chosen_parts_depend_on_the_input():
  m = make(selective=("B",), seed=7)
  assert m.x_proj.kernel.shape == (m.d_inner, D_STATE) and m.dt_proj is None
  rng = np.random.default_rng(7)
  x1, x2 = (jnp.asarray(rng.standard_normal((1, 3, m.d_inner))) for _ in range(2))
  (d1, _, b1, c1), (d2, _, b2, c2) = m.ssm_inputs(x1), m.ssm_inputs(x2)
  np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
  assert relative_error(b1, b2) > 0.1


def test_initialisation_statistics():
  d_model, d_state, dt_min, dt_max = 64, 16, 0.002, 0.05
  m = Mamba1Mixer(d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max,
                  rngs=nnx.Rngs(9))
  e, r = m.d_inner, m.dt_rank
  assert (e, r) == (128, 4)
  dt = np.asarray(jax.nn.softplus(m.dt_proj.bias[...].astype(jnp.float64)))
  assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
  # log-uniform: log dt ~ U(log dt_min, log dt_max), mean at the midpoint.
  mid, half = (math.log(dt_min) + math.log(dt_max)) / 2, (math.log(dt_max) - math.log(dt_min)) / 2
  assert abs(np.log(dt).mean() - mid) < 4 * half / math.sqrt(3 * e)
  np.testing.assert_allclose(m.A_log[...], np.log(np.tile(np.arange(1, d_state + 1), (e, 1))),
                             rtol=1e-6)
  assert m.A_log[...].dtype == jnp.float32 and m.D[...].dtype == jnp.float32
  np.testing.assert_array_equal(m.D[...], 1.0)
  bound = r ** -0.5
  w = np.asarray(m.dt_proj.kernel[...])
  assert w.shape == (r, e) and np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  for linear, fan_in in ((m.in_proj, d_model), (m.x_proj, e), (m.out_proj, e)):
    k = np.abs(np.asarray(linear.kernel[...]))
    assert k.max() <= fan_in ** -0.5 and k.max() > 0.9 * fan_in ** -0.5
  assert np.abs(np.asarray(m.conv1d.kernel[...])).max() <= 0.5  # 1/√(width 4)
  assert m.in_proj.bias is None and m.out_proj.bias is None
  for param in (m.A_log, m.D, m.dt_proj.bias, m.conv1d.bias):
    assert param.get_metadata().get("no_weight_decay") is True
  assert not m.in_proj.kernel.get_metadata().get("no_weight_decay", False)


def test_ablation_initialisations():
  const = make(dt_init="constant", dt_scale=2.0, dt_rank=5)
  np.testing.assert_allclose(const.dt_proj.kernel[...], 2.0 / math.sqrt(5), rtol=1e-12)
  lin = make(A_init="s4d_lin")
  a = np.asarray(lin.A())
  np.testing.assert_allclose(a.real, -0.5, rtol=1e-6)
  np.testing.assert_allclose(a.imag, np.tile(np.pi * np.arange(D_STATE), (lin.d_inner, 1)),
                             rtol=1e-6)
  assert lin.x_proj.kernel.shape == (lin.d_inner, lin.dt_rank + 4 * D_STATE)
  lin_real = make(A_init="s4d_lin_real")
  np.testing.assert_allclose(np.asarray(lin_real.A()), -0.5, rtol=1e-6)
  rand = Mamba1Mixer(64, d_state=16, A_init="random", rngs=nnx.Rngs(10))
  a_log = np.asarray(rand.A_log[...])
  assert abs(a_log.mean()) < 0.1 and abs(a_log.std() - 1) < 0.1
  s4d = make(ssm_kind="s4d")
  np.testing.assert_array_equal(s4d.B[...], 1.0)
  assert s4d.B.get_metadata().get("no_weight_decay") is True


@pytest.mark.slow
def test_init_state_and_step_shapes_and_dtypes():
  m = make(jnp.float32, A_init="s4d_lin")
  state = m.init_state(3)
  assert isinstance(state, Mamba1State)
  assert state.conv_state.shape == (3, m.d_inner, 3) and state.conv_state.dtype == jnp.float32
  assert state.ssm_state.shape == (3, m.d_inner, D_STATE)
  assert state.ssm_state.dtype == jnp.complex64
  y, new = m.step(jnp.ones((3, D_MODEL), jnp.float32), state)
  assert y.shape == (3, D_MODEL) and new.ssm_state.dtype == jnp.complex64


@pytest.mark.parametrize("kwargs,match", [
    (dict(ssm_kind="s5"), "ssm_kind"),
    (dict(ssm_kind="s4d", selective=("B",)), "selective"),
    (dict(selective=("delta", "A")), "selective"),
    (dict(selective="B"), "selective"),
    (dict(dt_rank=0), "dt_rank"),
    (dict(dt_init="normal"), "dt_init"),
    (dict(A_init="hippo"), "A_init"),
    (dict(d_state=0), "d_state"),
    (dict(d_conv=0), "d_conv"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_max"),
])
def test_constructor_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


def test_call_validation():
  m = make()
  u = jnp.zeros((1, 4, D_MODEL))
  with pytest.raises(ValueError, match="seq_idx"):
    m(u, seq_idx=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="u must have shape"):
    m(jnp.zeros((1, 4, D_MODEL + 1)))
  with pytest.raises(ValueError, match="state.ssm_state"):
    m.step(u[:, 0], Mamba1State(m.init_state(1).conv_state, jnp.zeros((1, 2, 2))))
