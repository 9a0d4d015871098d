"""Selective scan (S6), associative form: ``lax.associative_scan`` over the whole length.

The recurrence h_t = Ā_t h_{t−1} + B̄_t u_t is a composition of affine maps h ↦ a h + b, and
composing (a₁, b₁) then (a₂, b₂) gives (a₁a₂, a₂b₁ + b₂), which is associative; a parallel
prefix scan over the pairs (Ā_t, B̄_t u_t) therefore yields every h_t in O(log l) depth
(Mamba §3.3.2, "parallel scan"; Blelloch 1990; Smith et al. 2023, S5 §2.2).

This form materializes (b, l, g, p, n) for the whole sequence: use it for short sequences or as
the body of the chunked form (``selective_scan_chunked``), which applies it per chunk.

Same core signature as ``selective_scan_sequential`` (see there for the layout and dtypes).
"""

from __future__ import annotations

import jax
from jax import lax

from mamba_jax.ops.discretization import simplified_discretize
from mamba_jax.ops.selective_scan_sequential import readout


def _compose(first: tuple[jax.Array, jax.Array],
             second: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(a₁, b₁) then (a₂, b₂): h ↦ a₂(a₁h + b₁) + b₂ = (a₁a₂) h + (a₂b₁ + b₂)."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def selective_scan_associative(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                               C: jax.Array,
                               initial_state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Selective scan as a parallel prefix scan over (Ā_t, B̄_t u_t) along the length.

  h_t = (Ā_t ⋯ Ā_1) h_0 + Σ_{s≤t} (Ā_t ⋯ Ā_{s+1}) B̄_s u_s with Ā_t = exp(Δ_t A), B̄_t = Δ_t B_t;
  y_t = Re(C_t h_t). The initial state is folded into the first input: B̄_1u_1 + Ā_1 h_0.

  Args:
    u: (b, l, g, p) input.
    delta: (b, l, g, p) step sizes.
    A: (g, p, n).
    B: (b, l, g, n).
    C: (b, l, g, n).
    initial_state: (b, g, p, n).

  Returns:
    (y (b, l, g, p), state after the last token (b, g, p, n)).
  """
  decay, b_bar = simplified_discretize(delta, A, B)  # (b, l, g, p, n) each
  inputs = b_bar * u[..., None]
  inputs = inputs.at[:, 0].add(decay[:, 0] * initial_state)
  _, h = lax.associative_scan(_compose, (decay, inputs), axis=1)
  return readout(h, C), h[:, -1]
