"""The SSD algorithm: chunked state space duality (Mamba-2 §6, Listing 1).

The sequence is cut into chunks of q positions. The 1-semiseparable matrix of the quadratic
form splits into diagonal blocks (inside a chunk) and low-rank off-diagonal blocks (across
chunks), computed in four steps, each a separate function below:

  1. ``diagonal_block_output``: inside each chunk, the quadratic form (L ∘ C Bᵀ)(dt · x).
  2. ``chunk_states``: the state each chunk leaves behind from its own inputs,
     sum_s exp(decay s → chunk end) dt_s x_s ⊗ B_s.
  3. ``pass_states``: a scan over chunks, h_c = exp(whole-chunk decay) h_{c-1} + state_c,
     giving the state entering every chunk (and the final state).
  4. ``state_output``: each chunk reads the state entering it,
     C_t · exp(decay chunk start → t) h_{c-1}.

y = step 1 + step 4. The decays for all steps come from ``chunk_decays`` (the "chunk cumsum"
step of mamba_ssm): per-chunk log-decays dt·A turned into stable segment sums. Nothing of size
(b, l, h, p, n) is ever formed; the largest tensors are the diagonal blocks' weights
(b, c, h, q, q) and the chunk states (b, c, h, p, n). Step 1 is rematerialized in the backward
(``jax.checkpoint``), so the forward keeps only O(b·l·h·p) inputs and the chunk states for it,
not the (b, c, h, q, q) tensors.

Inside chunks the layout is head-major, (b, c, g, r, q, ...), so that every product is a
batched matmul over (b, c, g, r) with no transposes of the q × q tensors.

Any length works: the sequence is padded to a multiple of q with dt = 0 (decay 1, input 0) and
the result sliced back, which leaves outputs and final states unchanged. A chunk longer than
the sequence is shortened to the sequence length (same result, less work).

Shape legend: b batch, l length, c chunks, q chunk size (q indexes the target and s the source
position inside a chunk), h heads, p head_dim, n d_state, g groups, r heads per group (h = g·r).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mamba_jax.ops import segsum


class ChunkDecays(NamedTuple):
  """The decays of the chunked form, from per-chunk log-decays a = dt·A (compute dtype).

  Attributes:
    log: (b, c, g, r, q) log-decays a; the diagonal blocks build their mask L = exp(segsum(a))
      from it (see ``diagonal_block_output``).
    ids: (b, c, 1, 1, q) segment ids, or None.
    to_end: (b, c, g, r, s) decay from source s to the chunk's last position.
    from_start: (b, c, g, r, q) decay from the state entering the chunk to position q.
    chunk: (b, c, g, r) decay across the whole chunk (= from_start at the last position).
  """
  log: jax.Array
  ids: jax.Array | None
  to_end: jax.Array
  from_start: jax.Array
  chunk: jax.Array


def chunk_decays(dt: jax.Array, A: jax.Array, seq_idx: jax.Array | None) -> ChunkDecays:
  """Per-chunk log-decays a_t = dt_t A and the decays of chunk states and state passing.

  to_end[s] = exp(a[s+1] + ... + a[q-1]),  from_start[t] = exp(a[0] + ... + a[t]), each a
  cumsum of the covered log-decays (no differences of cumsums). With seq_idx, factors that
  cross a segment boundary are 0; the state entering chunk c belongs to the id at the end of
  chunk c-1 (a virtual id 0 before chunk 0).

  Args:
    dt: (b, c, g, r, q) processed step sizes in the compute dtype.
    A: (g, r) in the compute dtype.
    seq_idx: optional (b, c, q) integer segment ids.
  """
  log_decay = dt * A[..., None]
  if seq_idx is None:
    ids = previous = None
  else:
    ids = seq_idx[:, :, None, None, :]
    chunk_last = seq_idx[:, :, -1]  # (b, c)
    previous = jnp.concatenate([jnp.zeros_like(chunk_last[:, :1]), chunk_last[:, :-1]], axis=1)
    previous = previous[:, :, None, None]  # (b, c, 1, 1)
  from_start = segsum.decay_from_start(log_decay, ids, previous)
  return ChunkDecays(
      log=log_decay,
      ids=ids,
      to_end=segsum.decay_to_end(log_decay, ids),
      from_start=from_start,
      chunk=from_start[..., -1],
  )


def diagonal_block_output(x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array,
                          log_decay: jax.Array, ids: jax.Array | None) -> jax.Array:
  """Step 1, the diagonal blocks: y_q = sum_{s<=q} L[q, s] (C_q · B_s) dt_s x_s per chunk.

  L = exp(segsum(a)) is the chunk's 1-semiseparable mask (``segsum.decay_mask``); it is built
  inside the product so that XLA fuses it, and only the weights (b, c, h, q, s) are formed.

  Args:
    x: (b, c, g, r, s, p) in the compute dtype.
    dt: (b, c, g, r, s) in the compute dtype.
    B, C: (b, c, g, s, n) and (b, c, g, q, n), any floating dtype (products accumulate in
      the compute dtype).
    log_decay: (b, c, g, r, q) log-decays a.
    ids: optional (b, c, 1, 1, q) segment ids.

  Returns:
    (b, c, g, r, q, p) in the compute dtype.
  """
  dtype = log_decay.dtype
  scores = jnp.einsum("bcgqn,bcgsn->bcgqs", C, B, preferred_element_type=dtype)
  weights = scores[:, :, :, None] * segsum.decay_mask(log_decay, ids) * dt[..., None, :]
  return jnp.einsum("bcgrqs,bcgrsp->bcgrqp", weights, x)


def chunk_states(x: jax.Array, dt: jax.Array, B: jax.Array, to_end: jax.Array) -> jax.Array:
  """Step 2: the state at each chunk's end from its own inputs, sum_s to_end[s] dt_s x_s ⊗ B_s.

  Args:
    x: (b, c, g, r, s, p) in the compute dtype.
    dt: (b, c, g, r, s) in the compute dtype.
    B: (b, c, g, s, n) any floating dtype.
    to_end: (b, c, g, r, s) decay to the chunk end.

  Returns:
    (b, c, g, r, p, n) in the compute dtype.
  """
  weighted = x * (to_end * dt)[..., None]  # (b, c, g, r, s, p)
  return jnp.einsum("bcgrsp,bcgsn->bcgrpn", weighted, B.astype(weighted.dtype))


def pass_states(states: jax.Array, chunk_decay: jax.Array,
                initial_states: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Step 3: h_c = chunk_decay_c · h_{c-1} + states_c, a ``lax.scan`` over chunks.

  Args:
    states: (b, c, g, r, p, n) chunk states from step 2.
    chunk_decay: (b, c, g, r) whole-chunk decays.
    initial_states: (b, g, r, p, n) the state before chunk 0.

  Returns:
    entering: (b, c, g, r, p, n), the state entering each chunk (h_{c-1});
    final: (b, g, r, p, n), the state after the last chunk.
  """

  def step(state, inputs):
    chunk_state, decay = inputs
    return decay[..., None, None] * state + chunk_state, state

  final, entering = jax.lax.scan(
      step, initial_states, (jnp.moveaxis(states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
  return jnp.moveaxis(entering, 0, 1), final


def state_output(C: jax.Array, entering: jax.Array, from_start: jax.Array) -> jax.Array:
  """Step 4, the off-diagonal blocks: y_q = from_start[q] · C_q · h_{c-1}.

  Args:
    C: (b, c, g, q, n) any floating dtype.
    entering: (b, c, g, r, p, n) the state entering each chunk.
    from_start: (b, c, g, r, q) decay from the chunk start.

  Returns:
    (b, c, g, r, q, p) in the compute dtype.
  """
  y = jnp.einsum("bcgqn,bcgrpn->bcgrqp", C.astype(entering.dtype), entering)
  return y * from_start[..., None]


def _to_chunks(a: jax.Array, q: int, pad: int, mode: str = "constant") -> jax.Array:
  """(b, l, ...) -> (b, c, q, ...), padding the length at the end by ``pad``."""
  if pad:
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)
  return a.reshape(a.shape[0], -1, q, *a.shape[2:])


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                chunk_size: int, initial_states: jax.Array | None,
                seq_idx: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """SSD by the chunked algorithm of Mamba-2 §6 (Listing 1, ``ssd_minimal_discrete``).

  Same result as ``ssd_sequential``: h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,
  y_t = h_t C_t, with seq_idx resets (virtual seq_idx[-1] = 0).

  Args:
    x: (b, l, h, p) any floating dtype.
    dt: (b, l, h) processed step sizes; its dtype is the compute dtype (float32 or float64).
    A: (h,) in the compute dtype.
    B, C: (b, l, g, n) any floating dtype (bf16 products accumulate in the compute dtype).
    chunk_size: q, positions per chunk (shortened to l when l is smaller).
    initial_states: optional (b, h, p, n).
    seq_idx: optional (b, l) integer segment ids, nondecreasing.

  Returns:
    y: (b, l, h, p) and final_states: (b, h, p, n), both in the compute dtype.
  """
  dtype = dt.dtype
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  r = h // g
  q = min(chunk_size, l)
  pad = -l % q
  # Head-major inside chunks: (b, c, q, g, r, ...) -> (b, c, g, r, q, ...).
  xs = _to_chunks(x.astype(dtype).reshape(b, l, g, r, p), q, pad).transpose(0, 1, 3, 4, 2, 5)
  dts = _to_chunks(dt.reshape(b, l, g, r), q, pad).transpose(0, 1, 3, 4, 2)  # 0 in padding
  Bs = _to_chunks(B, q, pad).transpose(0, 1, 3, 2, 4)  # (b, c, g, q, n)
  Cs = _to_chunks(C, q, pad).transpose(0, 1, 3, 2, 4)
  ids = None if seq_idx is None else _to_chunks(seq_idx, q, pad, mode="edge")

  decays = chunk_decays(dts, A.reshape(g, r), ids)
  # Recomputed in the backward rather than stored: its (b, c, h, q, q) temporaries are the
  # largest tensors of the algorithm.
  y_diag = jax.checkpoint(diagonal_block_output)(xs, dts, Bs, Cs, decays.log, decays.ids)
  states = chunk_states(xs, dts, Bs, decays.to_end)
  if initial_states is None:
    h0 = jnp.zeros((b, g, r, p, n), dtype)
  else:
    h0 = initial_states.astype(dtype).reshape(b, g, r, p, n)
  entering, final = pass_states(states, decays.chunk, h0)
  y = y_diag + state_output(Cs, entering, decays.from_start)  # (b, c, g, r, q, p)
  y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, -1, h, p)[:, :l]
  return y, final.reshape(b, h, p, n)
