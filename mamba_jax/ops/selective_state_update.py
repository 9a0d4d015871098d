"""Selective scan (S6), single-step form for decoding: one token in, the new state out.

The same recurrence as ``selective_scan`` (Mamba §3.2 Algorithm 2, simplified discretization of
§2 eq. (4)) advanced by one token, with the semantics of mamba_ssm's
``selective_state_update``; functional: the new state is returned instead of written in place.
``impl="xla"`` is the reference below; ``impl="pallas"`` runs the same step as one Pallas GPU
kernel (``pallas_kernels.gpu.selective_state_update``), ``"pallas_interpret"`` that kernel in
the Pallas interpreter. ``"auto"`` is the XLA form on every platform: in Mamba-1's decoding
loop the kernel (with ``causal_conv1d_update``'s) made batch-1 decoding of mamba-1.4b slower on
an H100, 2.72 against 2.43 ms per token (scripts/profile_decode.py, one call): a custom call's
operands must be materialized, so the slices of in_proj's and x_proj's outputs and −exp(A_log)
that XLA fuses into the step became kernels of their own (823 kernels per token against 631).
Mamba-1's model step uses ``mamba_jax.ops.selective_decode_step`` instead, whose kernels read
those slices in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import check_choice, check_floating, check_rank, check_shape
from mamba_jax.ops.impl import resolve_impl
from mamba_jax.ops.selective_scan import (check_input_matrix, check_optional_vector,
                                          check_state, compute_dtypes, prepare_delta,
                                          skip_and_gate)
from mamba_jax.ops.selective_scan_sequential import selective_scan_step
from pallas_kernels.gpu import selective_state_update as kernel

IMPLS = ("xla", "pallas", "pallas_interpret")


def selective_state_update(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array,
                           B: jax.Array, C: jax.Array, D: jax.Array | None = None,
                           z: jax.Array | None = None, dt_bias: jax.Array | None = None,
                           dt_softplus: bool = False, impl: str = "auto"
                           ) -> tuple[jax.Array, jax.Array]:
  """One decoding step of the selective SSM (Mamba §3.2 Algorithm 2, one token).

    Δ = softplus(dt + dt_bias)               (bias and softplus optional)
    h' = exp(Δ A) ⊙ h + Δ B x                (simplified ZOH, Mamba §2 eq. (4))
    y = Re(C · h') + D ⊙ x
    out = y ⊙ silu(z)                        (if z is given)

  per channel i of d_inner, with B, C those of the group i // (d_inner // groups). Looping it
  over a sequence from the same state reproduces ``selective_scan`` token by token; complex A
  follows the same convention (Re(C · h'), not doubled).

  Shapes (b batch, e d_inner, n d_state, g groups):
    state: (b, e, n); x, dt, z: (b, e); A: (e, n); B, C: (b, n) or (b, g, n) with e % g == 0;
    D, dt_bias: (e,).

  Dtypes: computed in float32, or float64 when some input is float64 (complex for complex A;
  the state must then be complex too). out has x's dtype; the new state has state's dtype,
  so a decoding cache keeps its dtype from step to step.

  Args:
    state: the state before this token.
    x: this token's input (u in ``selective_scan``).
    dt: this token's step size before bias and softplus.
    A: diagonal state matrix, real or complex.
    B: input matrix of this token.
    C: output matrix of this token.
    D: skip connection.
    z: gate.
    dt_bias: added to dt before the softplus.
    dt_softplus: apply softplus to dt (after the bias).
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring).

  Returns:
    (out (b, e), new_state (b, e, n)).

  Raises:
    ValueError: on a wrong rank, shape or dtype of any argument, d_inner not divisible by the
      groups, or a complex B/C/state with a real A (or a real state with a complex A); or
      impl="pallas" for arguments the kernel does not take (saying why).
  """
  check_rank("x", x, 2, "(batch, d_inner)")
  check_floating("x", x)
  batch, d_inner = jnp.shape(x)
  check_shape("dt", dt, (batch, d_inner), "(batch, d_inner)")
  check_floating("dt", dt)
  check_rank("A", A, 2, "(d_inner, d_state)")
  check_floating("A", A, allow_complex=True)
  d_state = jnp.shape(A)[1]
  check_shape("A", A, (d_inner, d_state), "(d_inner, d_state)")
  is_complex = jnp.iscomplexobj(A)
  check_state("state", state, (batch, d_inner, d_state), "(batch, d_inner, d_state)",
              is_complex)
  groups = check_input_matrix("B", B, (batch,), "batch", d_inner, d_state, is_complex)
  if check_input_matrix("C", C, (batch,), "batch", d_inner, d_state, is_complex) != groups:
    raise ValueError(f"B and C must have the same number of groups, got B shape "
                     f"{tuple(jnp.shape(B))} and C shape {tuple(jnp.shape(C))}")
  check_optional_vector("D", D, d_inner)
  check_optional_vector("dt_bias", dt_bias, d_inner)
  if z is not None:
    check_shape("z", z, (batch, d_inner), "(batch, d_inner)")
    check_floating("z", z)
  check_choice("dt_softplus", dt_softplus, (False, True))

  impl = resolve_impl("selective_state_update", impl, IMPLS, lambda: "xla")
  if impl != "xla":
    why = kernel.check_supported(state, x, A, groups)
    if why:
      raise ValueError(f"selective_state_update impl={impl!r}: {why}; use impl='xla'")
    bc = lambda v: jnp.reshape(v, (batch, groups, d_state))
    return kernel.selective_state_update_pallas(
        state, x, dt, A, bc(B), bc(C), D, z, dt_bias, dt_softplus=dt_softplus,
        interpret=impl == "pallas_interpret")

  real, state_dtype = compute_dtypes(A, state, x, dt, B, C, D, z, dt_bias)
  delta = prepare_delta(dt, dt_bias, dt_softplus, real)
  if groups == 1:
    # The state keeps its stored shape (b, e, n), B and C (b, n) broadcast over e: the update
    # is then elementwise in the state's own layout, so XLA writes it in place into a
    # decoding loop's carried buffer (a (b, 1, e, n) view of it costs a state-sized copy per
    # step). Same arithmetic as the grouped form below.
    y, new_state = selective_scan_step(
        jnp.asarray(state, state_dtype), jnp.asarray(x, real), delta,
        jnp.asarray(A, state_dtype), jnp.asarray(B, state_dtype).reshape(batch, d_state),
        jnp.asarray(C, state_dtype).reshape(batch, d_state))
  else:
    per_group = d_inner // groups

    def grouped(v, dtype, axis):
      """Splits the d_inner axis ``axis`` of v into (g, p), in ``dtype``."""
      shape = jnp.shape(v)
      return jnp.asarray(v, dtype).reshape(*shape[:axis], groups, per_group,
                                           *shape[axis + 1:])

    def grouped_bc(v):
      return jnp.asarray(v, state_dtype).reshape(batch, groups, d_state)

    y, new_state = selective_scan_step(
        grouped(state, state_dtype, 1), grouped(x, real, 1), grouped(delta, real, 1),
        grouped(A, state_dtype, 0), grouped_bc(B), grouped_bc(C))
  out = skip_and_gate(y.reshape(batch, d_inner), x, D, z, real)
  return (out.astype(jnp.result_type(x)),
          new_state.reshape(batch, d_inner, d_state).astype(jnp.result_type(state)))
