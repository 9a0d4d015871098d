"""Selective scan (S6), chunked form: ``lax.scan`` over chunks, an associative scan inside each.

The length is cut into c chunks of q tokens. The state at the start of each chunk is carried
by a ``lax.scan`` over chunks; within a chunk the associative form runs from that state:

  h_{kq+t} = (Ā_{kq+t} ⋯ Ā_{kq+1}) h_{kq} + Σ_{s≤t} (Ā_{kq+t} ⋯ Ā_{kq+s+1}) B̄_{kq+s} u_{kq+s}

(Mamba §3.3.2's parallel scan, blocked). Only one chunk's (b, q, g, p, n) states exist at a
time, and the chunk body is wrapped in ``jax.checkpoint``: the backward pass keeps just the
chunk-start states (c, b, g, p, n) and recomputes each chunk's expanded states when it needs
them, so memory is O(b·l·d + c·b·d·n) instead of O(b·l·d·n).

A length that is not a multiple of q is padded with Δ = 0 and u = 0, i.e. Ā = exp(0·A) = 1 and
B̄u = 0: padded steps carry the state through unchanged, and their outputs are sliced off.

Same core signature as ``selective_scan_sequential`` (see there for the layout and dtypes),
plus ``chunk_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mamba_jax.ops.selective_scan_associative import selective_scan_associative

# Tokens per chunk. The per-chunk working set is a few (b, q, d_inner, n) arrays.
CHUNK_SIZE = 128


def check_chunk_size(chunk_size: int) -> None:
  """Raises unless ``chunk_size`` is a positive int."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def selective_scan_chunked(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                           C: jax.Array, initial_state: jax.Array,
                           chunk_size: int = CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  """Selective scan over chunks of at most ``chunk_size`` tokens (Mamba §3.2 Algorithm 2).

  h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, y_t = Re(C_t h_t), evaluated chunk by chunk with the
  chunk-start state carried between chunks.

  Args:
    u: (b, l, g, p) input.
    delta: (b, l, g, p) step sizes.
    A: (g, p, n).
    B: (b, l, g, n).
    C: (b, l, g, n).
    initial_state: (b, g, p, n).
    chunk_size: the chunk length q (a positive int); a sequence shorter than it is one chunk.

  Returns:
    (y (b, l, g, p), state after the last token (b, g, p, n)).
  """
  check_chunk_size(chunk_size)
  batch, length = u.shape[:2]
  q = min(chunk_size, length)
  c = -(-length // q)
  pad = c * q - length

  def to_chunks(x):
    """(b, l, ...) -> (c, b, q, ...), padding the length with zeros (Δ = 0: Ā = 1, B̄u = 0)."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, c, q, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk(h, xs):
    u_c, delta_c, B_c, C_c = xs
    y_c, h = selective_scan_associative(u_c, delta_c, A, B_c, C_c, h)
    return h, y_c

  final_state, y = lax.scan(chunk, initial_state, tuple(to_chunks(x) for x in (u, delta, B, C)))
  y = jnp.moveaxis(y, 0, 1).reshape(batch, c * q, *y.shape[3:])
  return y[:, :length], final_state
