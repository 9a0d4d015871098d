"""Selective scan (S6), sequential form: a ``lax.scan`` over time, the definition and the oracle.

Mamba §3.2, Algorithm 2, with the simplified discretization of §2 eq. (4):

  h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_t,    y_t = Re(C_t · h_t)

one channel at a time (A is diagonal, so every (channel, state) pair is a scalar recurrence).
This file holds the single step (also used by the decoding op) and the scan over the sequence.

All forms of the selective scan share one core signature, in the grouped layout prepared by
``mamba_jax.ops.selective_scan`` (validation, Δ preprocessing, D, z and dtypes live there):

  u, delta (b, l, g, p) real; A (g, p, n) real or complex; B, C (b, l, g, n);
  initial_state (b, g, p, n)  ->  y (b, l, g, p) real, final_state (b, g, p, n)

Letters: b batch, l length, g groups, p = d_inner // g channels per group, n state. Every array
arrives in the compute dtype (float32, or float64 for float64 inputs; the complex counterpart
for complex A, B, C and the state), and the results keep it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax.ops.discretization import simplified_discretize


def readout(h: jax.Array, C: jax.Array) -> jax.Array:
  """y = Re(Σ_n C_n h_n): (..., g, p, n) state and (..., g, n) C -> (..., g, p) real.

  A multiply and a sum rather than an einsum, so no matmul unit lowers the precision.
  For complex A this keeps the real part only; mamba_ssm's reference doubles it (treating
  each state as one of a conjugate pair), which this does not.
  """
  return jnp.real(jnp.sum(h * C[..., None, :], axis=-1))


def selective_scan_step(h: jax.Array, u: jax.Array, delta: jax.Array, A: jax.Array,
                        B: jax.Array, C: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the recurrence: h' = exp(ΔA) ⊙ h + (Δu) B, y = Re(C · h').

  Args:
    h: previous state, (b, g, p, n).
    u: input, (b, g, p).
    delta: step size Δ (already biased / softplus'ed), (b, g, p).
    A: (g, p, n).
    B: (b, g, n).
    C: (b, g, n).

  Returns:
    (y (b, g, p), new state (b, g, p, n)).

  Without groups the same code takes h (b, e, n), u and delta (b, e), A (e, n), B and C
  (b, n) (broadcast over e) and returns y (b, e), h' (b, e, n).
  """
  decay, b_bar = simplified_discretize(delta, A, B)
  h = decay * h + b_bar * u[..., None]
  return readout(h, C), h


def selective_scan_sequential(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                              C: jax.Array,
                              initial_state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Selective scan by ``lax.scan`` over the length, one step at a time (the oracle).

  Implements Mamba §3.2 Algorithm 2: h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, y_t = Re(C_t h_t).

  Args:
    u: (b, l, g, p) input.
    delta: (b, l, g, p) step sizes.
    A: (g, p, n).
    B: (b, l, g, n).
    C: (b, l, g, n).
    initial_state: (b, g, p, n), the state before the first token.

  Returns:
    (y (b, l, g, p), state after the last token (b, g, p, n)).
  """
  def step(h, xs):
    u_t, delta_t, B_t, C_t = xs
    y_t, h = selective_scan_step(h, u_t, delta_t, A, B_t, C_t)
    return h, y_t

  time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C))
  final_state, y = lax.scan(step, initial_state, time_major)
  return jnp.moveaxis(y, 0, 1), final_state
