"""Tests for mamba_jax.ops.norms against numpy float64 references and finite differences."""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from mamba_jax.ops.norms import gated_rms_norm, layer_norm, rms_norm
from tests.numerics import assert_close

# Norm-relative tolerances against float64 evaluated on the same (rounded) inputs.
TOLS = {jnp.float64: 1e-12, jnp.float32: 1e-6, jnp.bfloat16: 1e-2}
EPS = 1e-5


def _np(a):
  return None if a is None else np.asarray(jnp.asarray(a, jnp.float64))


def rms_reference(x, weight):
  x, weight = _np(x), _np(weight)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def layer_reference(x, weight, bias):
  x, weight, bias = _np(x), _np(weight), _np(bias)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * weight + (0 if bias is None else bias)


def gated_reference(x, z, weight, group_size, norm_before_gate):
  """Loops over groups: each slice [j*gs, (j+1)*gs) is RMS-normalised on its own."""
  x, z, weight = _np(x), _np(z), _np(weight)
  silu = lambda v: v / (1 + np.exp(-v))
  if z is not None and not norm_before_gate:
    x = x * silu(z)
  out = np.empty_like(x)
  for j in range(x.shape[-1] // group_size):
    part = x[..., j * group_size:(j + 1) * group_size]
    out[..., j * group_size:(j + 1) * group_size] = part / np.sqrt(
        np.mean(part * part, axis=-1, keepdims=True) + EPS)
  out = out * weight
  if z is not None and norm_before_gate:
    out = out * silu(z)
  return out


def _random(rng, shape, dtype, scale=1.0, shift=0.0):
  return jnp.asarray(shift + scale * rng.standard_normal(shape), dtype)


CASES = {  # name: (function of (x, z, weight, bias), reference, uses z, uses bias)
    "rms": (lambda x, z, w, b: rms_norm(x, w, EPS),
            lambda x, z, w, b: rms_reference(x, w)),
    "layer": (lambda x, z, w, b: layer_norm(x, w, b, EPS),
              lambda x, z, w, b: layer_reference(x, w, b)),
    "layer_no_bias": (lambda x, z, w, b: layer_norm(x, w, None, EPS),
                      lambda x, z, w, b: layer_reference(x, w, None)),
    "gated_no_z": (lambda x, z, w, b: gated_rms_norm(x, None, w, 4, eps=EPS),
                   lambda x, z, w, b: gated_reference(x, None, w, 4, False)),
    "gated_one_group": (lambda x, z, w, b: gated_rms_norm(x, z, w, eps=EPS),
                        lambda x, z, w, b: gated_reference(x, z, w, x.shape[-1], False)),
    "gated_groups": (lambda x, z, w, b: gated_rms_norm(x, z, w, 4, False, EPS),
                     lambda x, z, w, b: gated_reference(x, z, w, 4, False)),
    "gated_groups_norm_first": (lambda x, z, w, b: gated_rms_norm(x, z, w, 8, True, EPS),
                                lambda x, z, w, b: gated_reference(x, z, w, 8, True)),
}


def _inputs(rng, shape, dtype):
  d = shape[-1]
  # x off-centre so LayerNorm's centring matters; weight around 1 like a trained norm.
  return (_random(rng, shape, dtype, 2.0, 0.5), _random(rng, shape, dtype),
          _random(rng, (d,), dtype, 0.3, 1.0), _random(rng, (d,), dtype))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 16), (16,)])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_vjp(case, shape, dtype):
  """Forward vs numpy float64; gradients vs the float64 vjp of the same rounded inputs."""
  rng = np.random.default_rng([len(shape), list(CASES).index(case)])
  fn, reference = CASES[case]
  args = _inputs(rng, shape, dtype)
  y, vjp = jax.vjp(fn, *args)
  assert y.dtype == dtype and y.shape == shape
  assert_close(y, reference(*args), TOLS[dtype], f"{case} forward")

  cotangent = _random(rng, shape, dtype)
  grads = vjp(cotangent)
  up = lambda a: jnp.asarray(a, jnp.float64)
  _, vjp64 = jax.vjp(fn, *map(up, args))
  for name, g, g64 in zip("xzwb", grads, vjp64(up(cotangent))):
    assert g.dtype == dtype
    if np.any(np.asarray(g64)):  # arguments a case does not use get zero gradients
      assert_close(g, g64, TOLS[dtype], f"{case} d{name}")
    else:
      np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_float64_finite_differences(case):
  rng = np.random.default_rng(list(CASES).index(case))
  fn, _ = CASES[case]
  check_grads(fn, _inputs(rng, (3, 8), jnp.float64), order=1, modes=("rev",), eps=1e-6,
              atol=1e-7, rtol=1e-7)


def test_groups_are_independent():
  # With eps 0, scaling one group of x leaves the output of every group unchanged.
  rng = np.random.default_rng(0)
  x, z, w, _ = _inputs(rng, (3, 12), jnp.float64)
  y = gated_rms_norm(x, None, w, group_size=4, eps=0.0)
  y_scaled = gated_rms_norm(x.at[:, 4:8].multiply(100.0), None, w, group_size=4, eps=0.0)
  assert_close(y_scaled, y, 1e-9, "scaled group")


def test_hand_computed_rms():
  # x = [3, 4]: mean(x²) = (9 + 16) / 2 = 12.5; with eps 0, y = x / sqrt(12.5) · weight.
  y = rms_norm(jnp.array([3.0, 4.0], jnp.float64), jnp.array([1.0, 2.0], jnp.float64), eps=0.0)
  np.testing.assert_allclose(y, [3 / np.sqrt(12.5), 8 / np.sqrt(12.5)], rtol=1e-15)


def test_mixed_precision_under_jit():
  # bf16 activations with float32 weights, as in mixed-precision training.
  rng = np.random.default_rng(1)
  x, z = _random(rng, (4, 16), jnp.bfloat16), _random(rng, (4, 16), jnp.bfloat16)
  w = _random(rng, (16,), jnp.float32, 0.3, 1.0)
  y = jax.jit(gated_rms_norm, static_argnames=("group_size",))(x, z, w, group_size=8)
  assert y.dtype == jnp.bfloat16
  assert_close(y, gated_reference(x, z, w, 8, False), TOLS[jnp.bfloat16], "gated")


F32 = jnp.float32
BAD = [
    (lambda: rms_norm(jnp.zeros((2, 4), F32), jnp.zeros(3, F32)), "weight must have shape"),
    (lambda: rms_norm(jnp.zeros((2, 4), jnp.int32), jnp.zeros(4, F32)), "x must have a floating"),
    (lambda: rms_norm(jnp.zeros((), F32), jnp.zeros(4, F32)), "x must have shape"),
    (lambda: rms_norm(jnp.zeros((2, 4), F32), jnp.zeros(4, F32), eps=-1.0), "eps"),
    (lambda: layer_norm(jnp.zeros((2, 4), F32), jnp.zeros(4, F32), jnp.zeros(5, F32)),
     "bias must have shape"),
    (lambda: gated_rms_norm(jnp.zeros((2, 4), F32), jnp.zeros((2, 5), F32), jnp.zeros(4, F32)),
     "z must have shape"),
    (lambda: gated_rms_norm(jnp.zeros((2, 6), F32), None, jnp.zeros(6, F32), group_size=4),
     "divisible by group_size"),
    (lambda: gated_rms_norm(jnp.zeros((2, 6), F32), None, jnp.zeros(6, F32), group_size=0),
     "group_size"),
    (lambda: gated_rms_norm(jnp.zeros((2, 6), F32), None, jnp.zeros(6, F32), group_size=2.0),
     "group_size must be an int"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
