"""Discretization of a diagonal continuous-time SSM: (Δ, A, B) -> (Ā, B̄).

Mamba §2, eq. (4): the continuous system h'(t) = A h(t) + B x(t) is turned into the recurrence
h_t = Ā h_{t-1} + B̄ x_t by a rule depending on the step size Δ. With a diagonal A (one value
per channel and state, as in S4D and Mamba) everything is elementwise:

  zero-order hold (exact):  Ā = exp(ΔA),  B̄ = (ΔA)^{-1} (exp(ΔA) − I) · ΔB = (exp(ΔA) − 1)/A · B
  simplified (Mamba):       Ā = exp(ΔA),  B̄ = ΔB

Mamba (§3.5 and its reference code) uses the simplified rule: it is the first-order
approximation of ZOH's B̄ and avoids a division by A.

Shapes (letter legend: d channels, n state; ``...`` any leading axes, e.g. batch and length):
delta (..., d), A (d, n), B (..., n) broadcast to Ā, B̄ (..., d, n). The same code serves the
grouped layout of the selective scan: delta (..., g, p), A (g, p, n), B (..., g, n) give
(..., g, p, n), with p = d // g channels per group. A may be real or complex (S4D-Lin); B then
may be complex too. The results have the promoted dtype of the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this |ΔA| the ZOH factor expm1(x)/x is evaluated by its Taylor series; the remainder
# x^5/720 is then below 2e-18, under float64's rounding.
_TAYLOR_RADIUS = 1e-3


def _expm1_over_x(x: jax.Array) -> jax.Array:
  """φ₁(x) = (exp(x) − 1)/x, with φ₁(0) = 1; accurate and differentiable everywhere.

  Uses expm1 (no cancellation near 0) away from 0 and the Taylor series
  1 + x/2 + x²/6 + x³/24 + x⁴/120 near 0, with the "double where" so that neither branch
  produces NaN in the gradient.
  """
  small = jnp.abs(x) < _TAYLOR_RADIUS
  safe_x = jnp.where(small, jnp.ones_like(x), x)
  taylor_x = jnp.where(small, x, jnp.zeros_like(x))
  series = 1 + taylor_x * (1 / 2 + taylor_x * (1 / 6 + taylor_x * (1 / 24 + taylor_x / 120)))
  return jnp.where(small, series, jnp.expm1(safe_x) / safe_x)


def simplified_discretize(delta: jax.Array, A: jax.Array,
                          B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mamba's discretization: Ā = exp(ΔA), B̄ = ΔB (Mamba §2 eq. (4), simplified as in §3.5).

  Args:
    delta: step sizes Δ, (..., d) (or (..., g, p)), real.
    A: diagonal state matrix, (d, n) (or (g, p, n)), real or complex.
    B: input matrix, (..., n) (or (..., g, n)), real or complex.

  Returns:
    (Ā, B̄), both (..., d, n) (or (..., g, p, n)), in the promoted dtype of the inputs.
  """
  delta = delta[..., None]
  return jnp.exp(delta * A), delta * B[..., None, :]


def zoh_discretize(delta: jax.Array, A: jax.Array,
                   B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact zero-order hold for a diagonal A (Mamba §2 eq. (4)).

  Ā = exp(ΔA) and B̄ = (exp(ΔA) − 1)/A · B = Δ · φ₁(ΔA) · B with φ₁(x) = expm1(x)/x, so the
  limit A → 0 is B̄ = ΔB (no division by zero, no cancellation for small ΔA; complex A works).

  Args:
    delta: step sizes Δ, (..., d) (or (..., g, p)), real.
    A: diagonal state matrix, (d, n) (or (g, p, n)), real or complex.
    B: input matrix, (..., n) (or (..., g, n)), real or complex.

  Returns:
    (Ā, B̄), both (..., d, n) (or (..., g, p, n)), in the promoted dtype of the inputs.
  """
  delta = delta[..., None]
  dA = delta * A
  return jnp.exp(dA), delta * _expm1_over_x(dA) * B[..., None, :]
