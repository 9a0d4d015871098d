"""SSD in its quadratic, attention-like dual form (Mamba-2 §3.2 / §4, "masked attention").

Unrolling the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t gives

    y = (L ∘ C Bᵀ) (dt · x)   with  L[t, s] = exp(dt_{s+1} A + ... + dt_t A)  for s <= t,

the 1-semiseparable matrix of Mamba-2 §3.2.1 (eq. (4)-(6)); ``L`` is ``segsum.decay_mask``.
An initial state h_{-1} adds C_t · exp(dt_0 A + ... + dt_t A) h_{-1}. O(l²) time and memory:
this form is for checking the chunked one and for short sequences, not for long ones.

Shape legend: b batch, l length (t target, s source position), h heads, p head_dim,
n d_state, g groups, r heads per group (h = g·r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops import segsum


def ssd_quadratic(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                  chunk_size: int, initial_states: jax.Array | None,
                  seq_idx: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """SSD as one masked-attention matrix over the whole sequence.

  y_t = sum_{s<=t} L[t, s] (C_t · B_s) dt_s x_s + C_t · exp(sum_{k<=t} dt_k A) h_{-1}
  (Mamba-2 §3.2, eq. (6)); the final state is
  h_{l-1} = sum_s L[l-1, s] dt_s x_s ⊗ B_s + exp(sum_k dt_k A) h_{-1}.
  With seq_idx, L is 0 across segments and h_{-1} only reaches positions whose id is 0.

  Args:
    x: (b, l, h, p) any floating dtype.
    dt: (b, l, h) processed step sizes; its dtype is the compute dtype (float32 or float64).
    A: (h,) in the compute dtype.
    B, C: (b, l, g, n) any floating dtype (bf16 products accumulate in the compute dtype).
    chunk_size: unused; present so every form shares one signature.
    initial_states: optional (b, h, p, n).
    seq_idx: optional (b, l) integer segment ids.

  Returns:
    y: (b, l, h, p) and final_states: (b, h, p, n), both in the compute dtype.
  """
  del chunk_size
  dtype = dt.dtype
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  r = h // g
  xs = x.astype(dtype).reshape(b, l, g, r, p)
  dt_gr = jnp.moveaxis(dt.reshape(b, l, g, r), 1, -1)  # (b, g, r, l)
  log_decay = dt_gr * A.reshape(g, r)[..., None]  # (b, g, r, l)
  ids = None if seq_idx is None else seq_idx[:, None, None, :]  # (b, 1, 1, l)

  mask = segsum.decay_mask(log_decay, ids)  # (b, g, r, t, s)
  scores = jnp.einsum("btgn,bsgn->bgts", C, B, preferred_element_type=dtype)
  weights = scores[:, :, None] * mask * dt_gr[..., None, :]  # (b, g, r, t, s)
  y = jnp.einsum("bgrts,bsgrp->btgrp", weights, xs)

  to_end = segsum.decay_to_end(log_decay, ids) * dt_gr  # (b, g, r, s)
  final = jnp.einsum("bsgn,bgrs,bsgrp->bgrpn", B.astype(dtype), to_end, xs)

  if initial_states is not None:
    h0 = initial_states.astype(dtype).reshape(b, g, r, p, n)
    previous = None if seq_idx is None else jnp.zeros((b, 1, 1), seq_idx.dtype)
    from_start = segsum.decay_from_start(log_decay, ids, previous)  # (b, g, r, t)
    y = y + jnp.einsum("btgn,bgrpn,bgrt->btgrp", C.astype(dtype), h0, from_start)
    final = final + h0 * from_start[..., -1, None, None]
  return y.reshape(b, l, h, p), final.reshape(b, h, p, n)
