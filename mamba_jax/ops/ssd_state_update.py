"""One decoding step of the SSD recurrence (Mamba-2, scalar A per head).

The single-step form of ``ssd``: the same recurrence advanced by one token, with the semantics
of mamba_ssm's ``selective_state_update`` for Mamba-2 (A, dt, dt_bias and D shared across a
head), written functionally: the new state is returned, not written in place.

Shape legend: b batch, h heads, p head_dim, n d_state, g groups, r heads per group (h = g·r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import check_divisible, check_floating, check_rank, check_shape
from mamba_jax.ops.ssd import (NO_DT_LIMIT, compute_dtype, preprocess_dt, skip_and_gate,
                               validate_head_params)


def _validate(state, x, dt, A, B, C, D, z, dt_bias, dt_limit) -> None:
  """Raises ValueError on any malformed ``ssd_state_update`` argument."""
  check_rank("x", x, 3, "(batch, heads, head_dim)")
  check_floating("x", x)
  b, h, p = x.shape
  check_shape("dt", dt, (b, h), "(batch, heads)")
  check_floating("dt", dt)
  check_rank("B", B, 3, "(batch, groups, d_state)")
  g, n = B.shape[1], B.shape[2]
  check_shape("B", B, (b, g, n), "(batch, groups, d_state)")
  check_floating("B", B)
  check_shape("C", C, (b, g, n), "(batch, groups, d_state)")
  check_floating("C", C)
  check_divisible("heads (x.shape[1])", h, "groups (B.shape[1])", g)
  check_shape("state", state, (b, h, p, n), "(batch, heads, head_dim, d_state)")
  check_floating("state", state)
  validate_head_params(h, p, A, D, dt_bias, dt_limit)
  if z is not None:
    check_shape("z", z, (b, h, p), "(batch, heads, head_dim)")
    check_floating("z", z)


@jax.jit
def _step(state, x, dt, A, B, C):
  """h ← exp(dt A) h + dt x ⊗ B; y = h C. dt and A in the compute dtype; y in that dtype.

  The state keeps its stored shape (b, h, p, n) throughout and B, C are repeated per head
  ((b, h, n), small): the update is elementwise in the state's own layout, so XLA writes it
  in place into a decoding loop's carried buffer. (A grouped (b, g, r, p, n) view of the
  state costs a state-sized copy per step: the copy-free form reads and writes the state
  once.)
  """
  dtype = dt.dtype
  r = state.shape[1] // B.shape[1]
  B = jnp.repeat(B.astype(dtype), r, axis=1)  # (b, h, n): head i reads group i // r
  C = jnp.repeat(C.astype(dtype), r, axis=1)
  decay = jnp.exp(dt * A)  # (b, h)
  dx = dt[..., None] * x.astype(dtype)  # (b, h, p)
  new = decay[..., None, None] * state.astype(dtype) + dx[..., None] * B[:, :, None, :]
  return jnp.einsum("bhpn,bhn->bhp", new, C), new


def ssd_state_update(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
                     C: jax.Array, D: jax.Array | None = None, z: jax.Array | None = None,
                     dt_bias: jax.Array | None = None, dt_softplus: bool = False,
                     dt_limit: tuple[float, float] = NO_DT_LIMIT
                     ) -> tuple[jax.Array, jax.Array]:
  """Advances the SSD recurrence by one token (Mamba-2 §3.1, eq. (2); decoding, §7).

      dt ← clip(softplus(dt + dt_bias), *dt_limit)   (softplus/clip only when asked)
      h' = exp(dt A) h + dt x ⊗ B
      y  = (h' C + D x) · silu(z)

  per head; head i reads group i // (h // g) of B and C. Looping it over a sequence gives
  ``ssd``'s outputs and final state. ``dt_limit`` is applied as in ``ssd`` so that decoding
  matches the full forward (mamba_ssm's step has no clip argument).

  Args:
    state: (b, h, p, n) floating, usually float32.
    x: (b, h, p) floating.
    dt: (b, h) floating, raw step size.
    A: (h,) floating, <= 0.
    B, C: (b, g, n) floating, with h % g == 0.
    D: optional (h,) or (h, p) skip.
    z: optional (b, h, p) gate.
    dt_bias: optional (h,).
    dt_softplus: apply softplus to dt + dt_bias.
    dt_limit: (min, max) clip of dt; (0, inf) means no clip.

  Returns:
    y: (b, h, p) in x's dtype; new_state: (b, h, p, n) in state's dtype. The arithmetic runs in
    float32 (float64 when an input is float64).

  Raises:
    ValueError: on malformed arguments, naming the argument and what was expected.
  """
  _validate(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
  dtype = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
  with jax.named_scope("ssd_state_update"):
    dt = preprocess_dt(dt, dt_bias, dt_softplus, (float(dt_limit[0]), float(dt_limit[1])),
                       dtype)
    y, new_state = _step(state, x, dt, A.astype(dtype), B, C)
    y = skip_and_gate(y, x, D, z)
  return y.astype(x.dtype), new_state.astype(state.dtype)
