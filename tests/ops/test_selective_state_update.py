"""Tests of mamba_jax.ops.selective_state_update: one step against numpy (mamba_ssm's
selective_state_update_ref semantics), its vjp against a length-1 scan, token-by-token decoding
against the full forward, and argument validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from mamba_jax.ops.selective_state_update import selective_state_update
from tests.numerics import assert_close

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_inputs(seed, batch, length, d_inner, d_state, groups=1, bc_rank=3, is_complex=False,
                extras=True):
  """Random inputs for ``length`` tokens (time on axis 1), float64 / complex128 numpy."""
  rng = np.random.default_rng(seed)
  bc_shape = (batch, length, d_state) if bc_rank == 3 else (batch, length, groups, d_state)
  A = -np.exp(rng.uniform(np.log(0.01), np.log(2.0), (d_inner, d_state)))
  B, C = rng.standard_normal(bc_shape), rng.standard_normal(bc_shape)
  state = rng.standard_normal((batch, d_inner, d_state))
  if is_complex:
    A = A + 1j * np.pi * np.arange(d_state)
    B = B + 1j * rng.standard_normal(bc_shape)
    C = C + 1j * rng.standard_normal(bc_shape)
    state = state + 1j * rng.standard_normal(state.shape)
  inputs = dict(
      state=state, x=rng.standard_normal((batch, length, d_inner)),
      dt=(0.5 * rng.standard_normal((batch, length, d_inner)) if extras else
          rng.uniform(0.01, 0.3, (batch, length, d_inner))),
      A=A, B=B, C=C,
      D=rng.standard_normal(d_inner) if extras else None,
      z=rng.standard_normal((batch, length, d_inner)) if extras else None,
      dt_bias=rng.uniform(-3.0, -1.0, d_inner) if extras else None)
  return {k: v for k, v in inputs.items() if v is not None}


def cast(inputs, dtype):
  """Activations in ``dtype``; A, D, dt_bias and the state in float32 at least."""
  params_dtype = jnp.promote_types(dtype, jnp.float32)
  out = {}
  for name, v in inputs.items():
    real = params_dtype if name in ("A", "D", "dt_bias", "state") else dtype
    out[name] = jnp.asarray(v, jnp.promote_types(real, jnp.complex64) if np.iscomplexobj(v)
                            else real)
  return out


def token(inputs, t):
  """The step inputs of token t: per-token arrays lose their time axis."""
  return {k: v[:, t] if k in ("x", "dt", "B", "C", "z") else v for k, v in inputs.items()}


def numpy_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False):
  """mamba_ssm's selective_state_update_ref in numpy, with groups, returning the new state."""
  if dt_bias is not None:
    dt = dt + dt_bias
  if softplus:
    dt = np.logaddexp(0.0, dt)
  if B.ndim == 2:
    B, C = B[:, None], C[:, None]
  B = np.repeat(B, x.shape[1] // B.shape[1], axis=1)  # (b, e, n)
  C = np.repeat(C, x.shape[1] // C.shape[1], axis=1)
  state = state * np.exp(dt[..., None] * A) + (dt * x)[..., None] * B
  out = np.einsum("ben,ben->be", state, C).real
  if D is not None:
    out = out + x * D
  if z is not None:
    out = out * z / (1 + np.exp(-z))
  return out, state


@pytest.mark.parametrize("groups, bc_rank, is_complex, extras", [
    (2, 4, False, True), (1, 3, True, True), (1, 3, False, False)])
def test_step_matches_numpy(groups, bc_rank, is_complex, extras):
  inputs = token(make_inputs(0, 2, 1, 4, 3, groups, bc_rank, is_complex, extras), 0)
  out, new_state = selective_state_update(**inputs, dt_softplus=extras)
  out_ref, state_ref = numpy_step(**inputs, softplus=extras)
  assert out.dtype == jnp.float64
  assert new_state.dtype == (jnp.complex128 if is_complex else jnp.float64)
  assert_close(out, out_ref, 1e-13, "out")
  assert_close(new_state, state_ref, 1e-13, "new state")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_dtypes_and_vjp_match_one_token_scan(dtype):
  inputs = cast(token(make_inputs(1, 2, 1, 4, 3, 2, 4), 0), dtype)
  rng = np.random.default_rng(2)
  ct_out = jnp.asarray(rng.standard_normal((2, 4)), dtype)
  ct_state = jnp.asarray(rng.standard_normal((2, 4, 3)), inputs["state"].dtype)
  step = lambda args: selective_state_update(**args, dt_softplus=True)
  (out, new_state), vjp = jax.vjp(step, inputs)
  grads = vjp((ct_out, ct_state))[0]

  def one_token_scan(args):
    a = {k: jnp.asarray(v, jnp.float64) for k, v in args.items()}
    t = lambda v: v[:, None]
    y, h = selective_scan(t(a["x"]), t(a["dt"]), a["A"], t(a["B"]), t(a["C"]), a["D"], t(a["z"]),
                          a["dt_bias"], True, a["state"], True, "sequential")
    return y[:, 0], h

  (out_ref, state_ref), vjp_ref = jax.vjp(one_token_scan, inputs)
  grads_ref = vjp_ref((jnp.asarray(ct_out, jnp.float64), jnp.asarray(ct_state, jnp.float64)))[0]
  assert out.dtype == dtype and new_state.dtype == inputs["state"].dtype
  assert_close(out, out_ref, TOL[dtype], "out")
  assert_close(new_state, state_ref, TOL[dtype], "new state")
  for name in inputs:
    assert grads[name].dtype == inputs[name].dtype, name
    assert_close(grads[name], grads_ref[name], TOL[dtype], f"d{name}")


@functools.partial(jax.jit, static_argnames=("softplus",))
def decode_and_full_forward(inputs, softplus):
  """Token-by-token decoding from ``state`` (a scan over steps) and the chunked full forward."""
  per_token = {k: jnp.moveaxis(v, 1, 0) for k, v in inputs.items()
               if k in ("x", "dt", "B", "C", "z")}
  fixed = {k: v for k, v in inputs.items() if k not in per_token and k != "state"}

  def step(state, tok):
    return selective_state_update(state, **tok, **fixed, dt_softplus=softplus)[::-1]

  final_state, ys = jax.lax.scan(step, inputs["state"], per_token)
  full = selective_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                        inputs.get("D"), inputs.get("z"), inputs.get("dt_bias"), softplus,
                        inputs["state"], True, "chunked", 16)
  return (jnp.moveaxis(ys, 0, 1), final_state), full


@pytest.mark.parametrize("dtype, groups, bc_rank, is_complex, extras", [
    (jnp.float64, 2, 4, False, True),
    (jnp.float32, 1, 3, True, False),
    (jnp.bfloat16, 1, 3, False, True),
])
def test_token_by_token_equals_full_forward(dtype, groups, bc_rank, is_complex, extras):
  inputs = cast(make_inputs(3, 2, 63, 4, 3, groups, bc_rank, is_complex, extras), dtype)
  (y_steps, h_steps), (y_full, h_full) = decode_and_full_forward(inputs, extras)
  oracle = {k: jnp.asarray(v, jnp.complex128 if jnp.iscomplexobj(v) else jnp.float64)
            for k, v in inputs.items()}
  y_ref, h_ref = selective_scan(oracle["x"], oracle["dt"], oracle["A"], oracle["B"], oracle["C"],
                                oracle.get("D"), oracle.get("z"), oracle.get("dt_bias"), extras,
                                oracle["state"], True, "sequential")
  assert y_steps.dtype == y_full.dtype == dtype
  assert h_steps.dtype == h_full.dtype == inputs["state"].dtype
  for what, got in [("decoded y", y_steps), ("full y", y_full)]:
    assert_close(got, y_ref, TOL[dtype], what)
  for what, got in [("decoded final state", h_steps), ("full final state", h_full)]:
    assert_close(got, h_ref, TOL[dtype], what)
  if dtype == jnp.float64:
    assert_close(y_steps, y_full, 1e-12, "decoded vs full y")
    assert_close(h_steps, h_full, 1e-12, "decoded vs full state")


def _valid_args():
  rng = np.random.default_rng(0)
  b, e, n = 2, 4, 3
  return dict(state=np.zeros((b, e, n)), x=rng.standard_normal((b, e)),
              dt=rng.uniform(0.1, 1.0, (b, e)), A=-np.ones((e, n)),
              B=rng.standard_normal((b, n)), C=rng.standard_normal((b, n)))


BAD_INPUTS = [
    (dict(x=np.zeros((2, 4, 1))), r"^x must have shape \(batch, d_inner\)"),
    (dict(x=np.zeros((2, 4), np.int32)), r"^x must have a floating dtype"),
    (dict(dt=np.zeros((2, 5))), r"^dt must have shape"),
    (dict(A=np.zeros((5, 3))), r"^A must have shape"),
    (dict(state=np.zeros((2, 4, 2))), r"^state must have shape .*got shape \(2, 4, 2\)"),
    (dict(state=np.zeros((2, 4, 3), np.complex64)), r"^state has dtype complex64; it must be real"),
    (dict(A=-np.ones((4, 3), np.complex64)), r"^state has dtype float64; it must be complex"),
    (dict(B=np.zeros((3, 3))), r"^B must have shape"),
    (dict(C=np.zeros((2, 3), np.complex64)), r"^C has complex dtype .* A is real"),
    (dict(B=np.zeros((2, 3, 3)), C=np.zeros((2, 3, 3))),
     r"d_inner=4 must be divisible by the number of groups of B=3"),
    (dict(B=np.zeros((2, 2, 3))), r"B and C must have the same"),
    (dict(D=np.zeros((5,))), r"^D must have shape"),
    (dict(z=np.zeros((2, 5))), r"^z must have shape"),
    (dict(dt_bias=np.zeros((4,), np.int32)), r"^dt_bias must have a floating"),
    (dict(dt_softplus=None), r"^dt_softplus=None is not one of"),
]


@pytest.mark.parametrize("changes, message", BAD_INPUTS)
def test_bad_inputs_raise(changes, message):
  with pytest.raises(ValueError, match=message):
    selective_state_update(**{**_valid_args(), **changes})
