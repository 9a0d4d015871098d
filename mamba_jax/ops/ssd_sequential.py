"""SSD as a recurrence over time: the sequential oracle (``lax.scan`` over the length).

This is the definition the other forms (quadratic, chunked) are tested against. It follows the
Mamba-2 paper (Dao & Gu, 2024) §3.1 / eq. (1)-(2) with the scalar-times-identity A of §3.3:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t        (per head: h is (head_dim, d_state))
    y_t = h_t C_t

Packed sequences: the decay exp(dt_t A) is replaced by 0 where seq_idx[t] != seq_idx[t-1], with
a virtual seq_idx[-1] = 0, so the initial state only feeds a leading segment whose id is 0
(what mamba_ssm's kernels do).

Shape legend: b batch, l length, h heads, p head_dim, n d_state, g groups, r heads per group
(h = g·r; head i reads group i // r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_decay(dt: jax.Array, A: jax.Array, seq_idx: jax.Array | None) -> jax.Array:
  """Per-step decay exp(dt_t A), zeroed at segment starts.

  Args:
    dt: (b, l, h) processed step sizes in the compute dtype.
    A: (h,) in the compute dtype.
    seq_idx: optional (b, l) integer segment ids, nondecreasing.

  Returns:
    (b, l, h) in dt's dtype.
  """
  decay = jnp.exp(dt * A)
  if seq_idx is None:
    return decay
  previous = jnp.concatenate([jnp.zeros_like(seq_idx[:, :1]), seq_idx[:, :-1]], axis=1)
  continues = (seq_idx == previous)[:, :, None]
  return jnp.where(continues, decay, jnp.zeros((), decay.dtype))


def ssd_sequential(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   chunk_size: int, initial_states: jax.Array | None,
                   seq_idx: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """SSD by its recurrence, one time step per ``lax.scan`` iteration.

  h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,  y_t = h_t C_t   (Mamba-2 §3.1, eq. (2)).
  D, z and the dt preprocessing are applied by the caller (``ssd.ssd``).

  Args:
    x: (b, l, h, p) any floating dtype.
    dt: (b, l, h) processed step sizes; its dtype is the compute dtype (float32 or float64).
    A: (h,) in the compute dtype.
    B, C: (b, l, g, n) any floating dtype.
    chunk_size: unused; present so every form shares one signature.
    initial_states: optional (b, h, p, n) state before t = 0.
    seq_idx: optional (b, l) integer segment ids.

  Returns:
    y: (b, l, h, p) and final_states: (b, h, p, n), both in the compute dtype.
  """
  del chunk_size
  dtype = dt.dtype
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  r = h // g
  decay = step_decay(dt, A, seq_idx)
  if initial_states is None:
    state0 = jnp.zeros((b, g, r, p, n), dtype)
  else:
    state0 = initial_states.astype(dtype).reshape(b, g, r, p, n)

  def step(state, inputs):
    x_t, dt_t, decay_t, B_t, C_t = inputs  # (b,g,r,p) (b,g,r) (b,g,r) (b,g,n) (b,g,n)
    state = (decay_t[..., None, None] * state
             + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, None, :])
    y_t = jnp.einsum("bgrpn,bgn->bgrp", state, C_t)
    return state, y_t

  time_major = (
      jnp.moveaxis(x.astype(dtype).reshape(b, l, g, r, p), 1, 0),
      jnp.moveaxis(dt.reshape(b, l, g, r), 1, 0),
      jnp.moveaxis(decay.reshape(b, l, g, r), 1, 0),
      jnp.moveaxis(B.astype(dtype), 1, 0),
      jnp.moveaxis(C.astype(dtype), 1, 0),
  )
  final, ys = jax.lax.scan(step, state0, time_major)
  y = jnp.moveaxis(ys, 0, 1).reshape(b, l, h, p)
  return y, final.reshape(b, h, p, n)
