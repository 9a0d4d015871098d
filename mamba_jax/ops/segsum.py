"""Stable segment sums and the decay masks built from them (Mamba-2 SSD).

The SSD dual form needs, for a sequence of log-decays ``a``, the matrix of partial sums

    segsum(a)[i, j] = a[j+1] + ... + a[i]     for i >= j      (0 on the diagonal)
                    = -inf                    for i < j,

so that ``exp(segsum(a))`` is the 1-semiseparable mask ``L`` of the Mamba-2 paper (Dao & Gu,
2024, §3.2.1 and Listing 1). It is computed as a masked cumulative sum: ``a[i]`` is kept only
below the diagonal (``i > j``) and summed down each column. That avoids the tempting
difference ``cumsum(a)[i] - cumsum(a)[j]``, which loses precision when both cumsums are large,
overflows to ``-inf - -inf = NaN`` and cannot express resets.

Two functions give these numbers: ``segsum``, the definition (a cumsum over a (t, t) array),
and ``segsum_blocked``, the same partial sums assembled from O(t·block) pieces so that XLA fuses
the (t, t) result into its consumer. The decay masks use the latter.

Packed sequences: with segment ids, entries whose row and column lie in different segments are
``-inf`` too, so the decay between them is exactly 0. Masking happens on the exponent with
``jnp.where`` before ``exp``, so gradients stay finite.

Shapes: ``t`` is the axis summed over (the length, or the positions q within one chunk); any
leading axes ``...`` broadcast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _same_segment(segment_ids: jax.Array) -> jax.Array:
  """(..., t) ids -> (..., t, t) bool: ids[i] == ids[j]."""
  return segment_ids[..., :, None] == segment_ids[..., None, :]


def segsum(a: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Stable segment sum: the exponent of the 1-semiseparable decay mask.

  Mamba-2 (Dao & Gu, 2024) §3.2.1 / Listing 1 ``segsum``::

      out[..., i, j] = sum_{k=j+1}^{i} a[..., k]   if i >= j and ids[i] == ids[j]
                     = -inf                         otherwise

  computed as ``cumsum_i(where(i > j, a[i], 0))``: each entry is a sum of the ``a[k]`` it
  covers, never a difference of two long sums. ``-inf`` inputs propagate as ``-inf`` (a decay
  of exactly 0), never NaN.

  Args:
    a: (..., t) floating log-decays, typically ``dt * A`` (<= 0).
    segment_ids: optional (..., t) integer ids broadcastable against ``a``; entries across
      different ids are ``-inf``.

  Returns:
    (..., t, t) in ``a``'s dtype.
  """
  t = a.shape[-1]
  rows = jnp.arange(t, dtype=jnp.int32)[:, None]
  cols = jnp.arange(t, dtype=jnp.int32)[None, :]
  # below[..., i, j] = a[i] for i > j, else 0; cumsum over i sums a[j+1..i] into [i, j].
  below = jnp.where(rows > cols, a[..., :, None], jnp.zeros((), a.dtype))
  sums = jnp.cumsum(below, axis=-2)
  keep = rows >= cols
  if segment_ids is not None:
    keep = keep & _same_segment(segment_ids)
  return jnp.where(keep, sums, jnp.asarray(-jnp.inf, a.dtype))


def _exclusive_reverse_cumsum(a: jax.Array) -> jax.Array:
  """out[..., j] = a[..., j+1] + ... + a[..., t-1] (0 at the last position)."""
  shifted = jnp.concatenate([a[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)
  return jax.lax.cumsum(shifted, axis=a.ndim - 1, reverse=True)


def segsum_blocked(a: jax.Array, segment_ids: jax.Array | None = None,
                   block: int = 16) -> jax.Array:
  """``segsum`` assembled from O(t·block) partial sums, with no (t, t) intermediate.

  Same values as ``segsum`` (up to rounding order) and just as stable: positions are grouped
  in blocks of ``block``; for i in block I and j in block J,

      I == J:  the masked cumsum inside the block (``segsum`` of the block),
      I >  J:  (a[j+1] + ... + end of block J)            exclusive reverse cumsum in J
             + (totals of the blocks J+1, ..., I-1)       ``segsum`` of the block totals
             + (start of block I + ... + a[i])            cumsum in I,
      I <  J:  -inf,

  three sums over disjoint stretches of [j+1, i], never a difference. The (t, t) result is an
  elementwise function of these small pieces, so XLA fuses it into its consumer (e.g. ``exp``
  and the products of the SSD diagonal blocks) instead of materializing a cumsum over (t, t).

  Args:
    a: (..., t) floating log-decays.
    segment_ids: optional (..., t) integer ids broadcastable against ``a``.
    block: positions per block (16 by default).

  Returns:
    (..., t, t) in ``a``'s dtype.
  """
  t = a.shape[-1]
  m = -(-t // block)
  if m * block != t:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, m * block - t)])
  blocks = a.reshape(*a.shape[:-1], m, block)  # (..., m, s): m blocks of s = block positions
  local = segsum(blocks)  # (..., m, s, s)
  from_start = jnp.cumsum(blocks, axis=-1)  # (..., m, s)
  to_end = _exclusive_reverse_cumsum(blocks)  # (..., m, s)
  totals = segsum(jnp.sum(blocks, axis=-1))  # (..., m, m): totals of blocks J+1..I
  neg_inf = jnp.asarray(-jnp.inf, a.dtype)
  # Row I of ``between`` is row I-1 of ``totals``: the blocks strictly between J and I.
  between = jnp.concatenate(
      [jnp.full(totals[..., :1, :].shape, neg_inf), totals[..., :-1, :]], axis=-2)
  cross = (from_start[..., :, :, None, None] + between[..., :, None, :, None]
           + to_end[..., None, None, :, :])  # (..., m, s, m, s)
  rows = jnp.arange(m, dtype=jnp.int32)
  same_block = (rows[:, None] == rows[None, :])[:, None, :, None]  # (m, 1, m, 1)
  out = jnp.where(same_block, local[..., :, :, None, :], cross)
  out = out.reshape(*a.shape[:-1], m * block, m * block)[..., :t, :t]
  if segment_ids is not None:
    out = jnp.where(_same_segment(segment_ids), out, neg_inf)
  return out


def decay_mask(a: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The 1-semiseparable decay mask ``L = exp(segsum(a))``.

  Mamba-2 §3.2.1: ``L[i, j] = a_i · a_{i-1} ··· a_{j+1}`` in the paper's multiplicative
  notation (``exp`` of our log-decays), 1 on the diagonal, 0 above it and across segments.
  Built with ``segsum_blocked`` so that no (t, t) cumsum is materialized.

  Args:
    a: (..., t) floating log-decays.
    segment_ids: optional (..., t) integer ids (see ``segsum``).

  Returns:
    (..., t, t) in ``a``'s dtype, values in [0, 1] when ``a <= 0``.
  """
  return jnp.exp(segsum_blocked(a, segment_ids))


def decay_to_end(a: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Decay from each position to the last one: the last row of ``decay_mask``.

  ``out[..., j] = exp(a[j+1] + ... + a[t-1])``, 0 where ``ids[j] != ids[t-1]``. This weights
  each input's contribution to the state at the end of a chunk (Mamba-2 §6, "chunk states").
  Computed as an exclusive reverse cumsum, O(t) rather than the O(t²) mask.

  Args:
    a: (..., t) floating log-decays.
    segment_ids: optional (..., t) integer ids broadcastable against ``a``.

  Returns:
    (..., t) in ``a``'s dtype.
  """
  exponent = _exclusive_reverse_cumsum(a)
  if segment_ids is not None:
    same = segment_ids == segment_ids[..., -1:]
    exponent = jnp.where(same, exponent, jnp.asarray(-jnp.inf, a.dtype))
  return jnp.exp(exponent)


def decay_from_start(a: jax.Array, segment_ids: jax.Array | None = None,
                     previous_id: jax.Array | None = None) -> jax.Array:
  """Decay from the state before position 0 to each position: ``exp(a[0] + ... + a[i])``.

  This weights the incoming state's contribution to each output of a chunk (Mamba-2 §6,
  "state → output") and, at ``i = t-1``, the whole chunk's decay used in state passing. With
  segment ids, 0 where ``ids[i] != previous_id`` (the id the incoming state belongs to).

  Args:
    a: (..., t) floating log-decays.
    segment_ids: optional (..., t) integer ids broadcastable against ``a``.
    previous_id: (...,) or broadcastable ids of the incoming state; required with
      ``segment_ids``.

  Returns:
    (..., t) in ``a``'s dtype.
  """
  exponent = jnp.cumsum(a, axis=-1)
  if segment_ids is not None:
    if previous_id is None:
      raise ValueError("decay_from_start: previous_id is required when segment_ids is given")
    same = segment_ids == previous_id[..., None]
    exponent = jnp.where(same, exponent, jnp.asarray(-jnp.inf, a.dtype))
  return jnp.exp(exponent)
