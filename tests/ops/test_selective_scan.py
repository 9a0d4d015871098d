"""Tests of mamba_jax.ops.selective_scan: the oracle by hand and against numpy, every form
against the float64 oracle (forward and vjp), memory of the chunked form, long sequences, and
argument validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from tests.numerics import assert_close

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
ORACLE_VS_NUMPY_TOL = 1e-12


def make_inputs(seed, batch, length, d_inner, d_state, groups=1, bc_rank=3, is_complex=False,
                with_D=True, with_z=True, with_bias=True, with_state=True):
  """Random float64 / complex128 inputs as numpy arrays, in mamba-like ranges."""
  rng = np.random.default_rng(seed)
  bc_shape = (batch, length, d_state) if bc_rank == 3 else (batch, length, groups, d_state)
  # |A| spans 0.01 .. 2 so that some channels remember the whole sequence.
  A = -np.exp(rng.uniform(np.log(0.01), np.log(2.0), (d_inner, d_state)))
  B, C = rng.standard_normal(bc_shape), rng.standard_normal(bc_shape)
  h0 = rng.standard_normal((batch, d_inner, d_state))
  if is_complex:
    A = A + 1j * np.pi * np.arange(d_state)  # S4D-Lin
    B = B + 1j * rng.standard_normal(bc_shape)
    C = C + 1j * rng.standard_normal(bc_shape)
    h0 = h0 + 1j * rng.standard_normal(h0.shape)
  inputs = dict(
      u=rng.standard_normal((batch, length, d_inner)),
      delta=(0.5 * rng.standard_normal((batch, length, d_inner)) if with_bias else
             rng.uniform(0.01, 0.3, (batch, length, d_inner))),
      A=A, B=B, C=C,
      D=rng.standard_normal(d_inner) if with_D else None,
      z=rng.standard_normal((batch, length, d_inner)) if with_z else None,
      delta_bias=rng.uniform(-3.0, -1.0, d_inner) if with_bias else None,
      initial_state=h0 if with_state else None)
  return {k: v for k, v in inputs.items() if v is not None}


def cast_inputs(inputs, dtype):
  """Activations in ``dtype``; A, D, delta_bias and the state in float32 at least (as in Mamba)."""
  params_dtype = jnp.promote_types(dtype, jnp.float32)
  out = {}
  for name, x in inputs.items():
    real = params_dtype if name in ("A", "D", "delta_bias", "initial_state") else dtype
    out[name] = jnp.asarray(x, jnp.promote_types(real, jnp.complex64) if np.iscomplexobj(x)
                            else real)
  return out


def as_oracle_inputs(inputs):
  """The same (rounded) values in float64 / complex128."""
  return {k: jnp.asarray(v, jnp.complex128 if jnp.iscomplexobj(v) else jnp.float64)
          for k, v in inputs.items()}


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "softplus"))
def forward_and_vjp(inputs, cotangents, impl, chunk_size, softplus):
  def f(args):
    return selective_scan(**args, delta_softplus=softplus, return_final_state=True, impl=impl,
                          chunk_size=chunk_size)
  outputs, vjp = jax.vjp(f, inputs)
  return outputs, vjp(cotangents)[0]


def numpy_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False,
                    initial_state=None):
  """mamba_ssm's selective_scan_ref (without the ×2 for complex A), in numpy, time-major loop."""
  batch, length, d_inner = u.shape
  if delta_bias is not None:
    delta = delta + delta_bias
  if softplus:
    delta = np.logaddexp(0.0, delta)
  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  B = np.repeat(B, d_inner // B.shape[2], axis=2)  # (b, l, e, n)
  C = np.repeat(C, d_inner // C.shape[2], axis=2)
  h = np.zeros((batch, d_inner, A.shape[1]), np.result_type(A, B))
  if initial_state is not None:
    h = h + initial_state
  ys = []
  for t in range(length):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t]
    ys.append(np.einsum("ben,ben->be", h, C[:, t]).real)
  y = np.stack(ys, axis=1)
  if D is not None:
    y = y + u * D
  if z is not None:
    y = y * z / (1 + np.exp(-z))
  return y, h


def test_oracle_by_hand():
  # d_inner = 1, d_state = 1, length 3; A = −ln 2, Δ = (1, 2, 1) so Ā = (1/2, 1/4, 1/2);
  # u = (2, 1, 4), B = (1, 0.5, 1) so ΔBu = (2, 1, 4); C = (1, 2, 3), D = 0.5.
  # From h_0 = 0:  h = (2, 0.25·2 + 1, 0.5·1.5 + 4) = (2, 1.5, 4.75)
  #                Ch = (2, 3, 14.25);  + Du = (1, 0.5, 2)  ->  y = (3, 3.5, 16.25)
  # From h_0 = 8:  h = (0.5·8 + 2, 0.25·6 + 1, 0.5·2.5 + 4) = (6, 2.5, 5.25)
  #                Ch = (6, 5, 15.75);  + Du  ->  y = (7, 5.5, 17.75)
  u = jnp.array([2.0, 1.0, 4.0]).reshape(1, 3, 1)
  delta = jnp.array([1.0, 2.0, 1.0]).reshape(1, 3, 1)
  A = jnp.array([[-np.log(2.0)]])
  B = jnp.array([1.0, 0.5, 1.0]).reshape(1, 3, 1)
  C = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
  D = jnp.array([0.5])
  for h0, y_want, h_want in [(0.0, [3.0, 3.5, 16.25], 4.75), (8.0, [7.0, 5.5, 17.75], 5.25)]:
    y, h = selective_scan(u, delta, A, B, C, D, initial_state=jnp.full((1, 1, 1), h0),
                          return_final_state=True, impl="sequential")
    np.testing.assert_allclose(y.ravel(), y_want, rtol=1e-14)
    np.testing.assert_allclose(h.ravel(), [h_want], rtol=1e-14)


@pytest.mark.parametrize("groups, bc_rank, is_complex, extras", [
    (2, 4, False, True),
    (1, 3, True, True),
    (1, 3, False, False),
])
def test_oracle_matches_numpy(groups, bc_rank, is_complex, extras):
  inputs = make_inputs(0, 2, 63, 4, 3, groups, bc_rank, is_complex, with_D=extras,
                       with_z=extras, with_bias=extras, with_state=extras)
  y, h = selective_scan(**inputs, delta_softplus=extras, return_final_state=True,
                        impl="sequential")
  y_ref, h_ref = numpy_reference(**inputs, softplus=extras)
  assert y.dtype == jnp.float64
  assert h.dtype == (jnp.complex128 if is_complex else jnp.float64)
  assert_close(y, y_ref, ORACLE_VS_NUMPY_TOL, "y")
  assert_close(h, h_ref, ORACLE_VS_NUMPY_TOL, "final state")


# (impl, dtype, batch, length, d_inner, d_state, groups, bc_rank, complex, extras, chunk_size)
# "extras" switches D, z, delta_bias + softplus and the initial state on together. Compiling
# each form's vjp costs seconds of CPU, so two cases that only repeat coverage are slow.
FORM_CASES = [
    ("sequential", jnp.bfloat16, 1, 257, 4, 2, 1, 3, False, True, 0),
    ("associative", jnp.float64, 2, 63, 4, 3, 1, 3, False, True, 0),
    pytest.param("associative", jnp.float32, 1, 257, 6, 4, 3, 4, False, False, 0,
                 marks=pytest.mark.slow),
    ("associative", jnp.bfloat16, 2, 63, 4, 2, 2, 4, False, True, 0),
    ("associative", jnp.float32, 2, 63, 4, 2, 2, 4, True, True, 0),
    ("chunked", jnp.float64, 2, 500, 4, 3, 2, 4, False, True, 128),
    ("chunked", jnp.float32, 1, 257, 6, 4, 1, 3, False, False, 64),
    ("chunked", jnp.bfloat16, 2, 500, 4, 2, 1, 3, False, True, 128),
    pytest.param("chunked", jnp.float64, 1, 63, 4, 2, 2, 4, True, True, 16,
                 marks=pytest.mark.slow),
    ("chunked", jnp.float32, 2, 257, 4, 2, 4, 4, True, False, 64),
    ("chunked", jnp.float32, 1, 1, 2, 2, 1, 4, False, True, 16),
]


@pytest.mark.parametrize("impl, dtype, batch, length, d_inner, d_state, groups, bc_rank, "
                         "is_complex, extras, chunk_size", FORM_CASES)
def test_form_matches_oracle(impl, dtype, batch, length, d_inner, d_state, groups, bc_rank,
                             is_complex, extras, chunk_size):
  raw = make_inputs(length, batch, length, d_inner, d_state, groups, bc_rank, is_complex,
                    with_D=extras, with_z=extras, with_bias=extras, with_state=extras)
  inputs = cast_inputs(raw, dtype)
  rng = np.random.default_rng(length + 1)
  ct_y = jnp.asarray(rng.standard_normal((batch, length, d_inner)), dtype)
  ct_h = rng.standard_normal((batch, d_inner, d_state))
  if is_complex:
    ct_h = ct_h + 1j * rng.standard_normal(ct_h.shape)
  (y, h), grads = forward_and_vjp(inputs, (ct_y, jnp.asarray(ct_h, inputs["A"].dtype)), impl,
                                  chunk_size or 128, extras)
  (y_ref, h_ref), grads_ref = forward_and_vjp(
      as_oracle_inputs(inputs), (jnp.asarray(ct_y, jnp.float64), jnp.asarray(ct_h)),
      "sequential", 128, extras)

  assert y.dtype == dtype and y.shape == (batch, length, d_inner)
  state_dtype = jnp.promote_types(jnp.promote_types(dtype, jnp.float32),
                                  jnp.complex64 if is_complex else jnp.float32)
  assert h.dtype == state_dtype and h.shape == (batch, d_inner, d_state)
  tol = TOL[dtype]
  assert_close(y, y_ref, tol, f"{impl} y")
  assert_close(h, h_ref, tol, f"{impl} final state")
  assert set(grads) == set(inputs)
  for name in inputs:
    assert grads[name].dtype == inputs[name].dtype, name
    assert_close(grads[name], grads_ref[name], tol, f"{impl} d{name}")


def test_auto_is_chunked_on_cpu():
  inputs = cast_inputs(make_inputs(3, 1, 63, 4, 2), jnp.float32)
  auto = selective_scan(**inputs, delta_softplus=True)
  chunked = selective_scan(**inputs, delta_softplus=True, impl="chunked")
  np.testing.assert_array_equal(auto, chunked)


MEMORY_SHAPE = dict(batch=2, length=8192, d_inner=512, d_state=16)


@pytest.mark.parametrize("with_grad", [False, True])
def test_chunked_memory_is_linear_in_length(with_grad):
  """Temporaries stay far below one (b, l, e, n) float32 tensor (512 MiB here).

  What remains are a few (b, l, e) float32 buffers (1/16 of it each: the inputs laid out
  chunk-major for the scan, the stacked outputs and, for the gradient, their cotangents) and
  one chunk's (b, q, e, n) working set.
  """
  b, l, e, n = MEMORY_SHAPE.values()
  f32 = jnp.float32
  args = [jax.ShapeDtypeStruct(s, f32) for s in
          [(b, l, e), (b, l, e), (e, n), (b, l, n), (b, l, n), (e,), (b, l, e), (e,)]]

  def loss(u, delta, A, B, C, D, z, delta_bias):
    y = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, impl="chunked")
    return jnp.sum(y) if with_grad else y

  f = jax.grad(loss, argnums=tuple(range(8))) if with_grad else loss
  temp = jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes
  full = b * l * e * n * 4
  assert temp < full * (5 / 8 if with_grad else 1 / 4), f"temporaries {temp / full:.3f} of full"


@pytest.mark.parametrize("impl", ["chunked", "associative"])
def test_long_sequence_stays_finite(impl):
  # Length 65536, Δ up to 10 and |A| up to 20: exp(ΔA) underflows to 0, nothing overflows;
  # forward for both forms, and the gradient of the chunked one.
  rng = np.random.default_rng(7)
  b, l, e, n = 1, 65536, 2, 2
  bf16 = jnp.bfloat16
  u = jnp.asarray(rng.standard_normal((b, l, e)), bf16)
  delta = jnp.asarray(rng.uniform(0.0, 10.0, (b, l, e)), bf16)
  A = jnp.asarray(-rng.uniform(0.0, 20.0, (e, n)), jnp.float32)
  B = jnp.asarray(rng.standard_normal((b, l, n)), bf16)
  C = jnp.asarray(rng.standard_normal((b, l, n)), bf16)

  @jax.jit
  def run(u, delta, A, B, C):
    f = lambda *args: selective_scan(*args, return_final_state=True, impl=impl)
    if impl != "chunked":  # the training path; the gradient of the others costs CI time
      return f(u, delta, A, B, C), ()
    (y, h), vjp = jax.vjp(f, u, delta, A, B, C)
    return (y, h), vjp((jnp.ones_like(y), jnp.ones_like(h)))

  (y, h), grads = run(u, delta, A, B, C)
  for what, x in [("y", y), ("final state", h)] + [(f"grad {i}", g) for i, g in enumerate(grads)]:
    assert np.all(np.isfinite(np.asarray(x, np.float32))), what
  assert float(jnp.max(jnp.abs(y.astype(jnp.float32)))) > 0


def _valid_args():
  rng = np.random.default_rng(0)
  b, l, e, n = 2, 5, 4, 3
  return dict(u=rng.standard_normal((b, l, e)), delta=rng.uniform(0.1, 1.0, (b, l, e)),
              A=-np.ones((e, n)), B=rng.standard_normal((b, l, n)),
              C=rng.standard_normal((b, l, n)))


BAD_INPUTS = [
    (dict(u=np.zeros((2, 5))), r"^u must have shape"),
    (dict(u=np.zeros((2, 0, 4)), delta=np.zeros((2, 0, 4)), B=np.zeros((2, 0, 3)),
          C=np.zeros((2, 0, 3))), r"^u must have length >= 1"),
    (dict(u=np.zeros((2, 5, 4), np.int32)), r"^u must have a floating dtype, got int32"),
    (dict(delta=np.zeros((2, 6, 4))), r"^delta must have shape .*got shape \(2, 6, 4\)"),
    (dict(delta=np.zeros((2, 5, 4), np.int32)), r"^delta must have a floating"),
    (dict(A=np.zeros((5, 3))), r"^A must have shape \(d_inner, d_state\)"),
    (dict(A=np.zeros((4, 3, 1))), r"^A must have shape"),
    (dict(A=np.zeros((4, 3), np.int64)), r"^A must have a floating or complex"),
    (dict(B=np.zeros((2, 6, 3))), r"^B must have shape .*got shape \(2, 6, 3\)"),
    (dict(B=np.zeros((2, 5, 1, 1, 3))), r"^B must have shape"),
    (dict(C=np.zeros((2, 5, 4))), r"^C must have shape .*got shape \(2, 5, 4\)"),
    (dict(B=np.zeros((2, 5, 3, 3)), C=np.zeros((2, 5, 3, 3))),
     r"d_inner=4 must be divisible by the number of groups of B=3"),
    (dict(B=np.zeros((2, 5, 2, 3)), C=np.zeros((2, 5, 3))), r"B and C must have the same"),
    (dict(B=np.zeros((2, 5, 3), np.complex64)), r"^B has complex dtype .* A is real"),
    (dict(C=np.zeros((2, 5, 3), np.complex64)), r"^C has complex dtype .* A is real"),
    (dict(B=np.zeros((2, 5, 3), np.int32)), r"^B must have a floating"),
    (dict(D=np.zeros((3,))), r"^D must have shape \(d_inner,\)"),
    (dict(D=np.zeros((4,), np.int32)), r"^D must have a floating"),
    (dict(z=np.zeros((2, 5, 3))), r"^z must have shape"),
    (dict(delta_bias=np.zeros((4, 1))), r"^delta_bias must have shape"),
    (dict(initial_state=np.zeros((2, 4, 2))), r"^initial_state must have shape"),
    (dict(initial_state=np.zeros((2, 4, 3), np.complex64)),
     r"^initial_state has dtype complex64; it must be real"),
    (dict(A=-np.ones((4, 3), np.complex64), initial_state=np.zeros((2, 4, 3))),
     r"^initial_state has dtype float64; it must be complex"),
    (dict(impl="cuda"), r"impl='cuda' is not one of"),
    (dict(chunk_size=0), r"^chunk_size must be a positive int"),
    (dict(delta_softplus="yes"), r"^delta_softplus='yes' is not one of"),
]


@pytest.mark.parametrize("changes, message", BAD_INPUTS)
def test_bad_inputs_raise(changes, message):
  with pytest.raises(ValueError, match=message):
    selective_scan(**{**_valid_args(), **changes})
