"""In-kernel building blocks shared by the TPU SSD forward and backward kernels.

Everything here runs inside a Mosaic TPU kernel on values already loaded from VMEM: matmuls
on the MXU with float32 accumulation, conversions between a row vector (1, q) (positions along
lanes, how per-position vectors arrive) and a column vector (q, 1) (positions along sublanes,
how they scale the rows of a (q, p) tile), and the chunk's decay mask.

Shape legend: q positions of a chunk (t the target row, s the source column), p head_dim,
n d_state.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def matmul(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """a·b contracting ``a``'s axis ``contract_a`` with ``b``'s ``contract_b``; float32 result.

  Both operands are 2-D and in the kernel's matmul dtype: bf16 runs natively on the MXU;
  float32 asks for full float32 contraction (``Precision.HIGHEST``, Mosaic's
  ``contract_precision<fp32>``), not one bf16 pass.
  """
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=(precision, precision), preferred_element_type=jnp.float32)


def _eye(q: int) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return rows == cols


def row_to_col(row: jax.Array) -> jax.Array:
  """(1, q) -> (q, 1): the diagonal of the row broadcast down, summed along lanes (exact)."""
  q = row.shape[-1]
  return jnp.sum(jnp.where(_eye(q), row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def col_to_row(col: jax.Array) -> jax.Array:
  """(q, 1) -> (1, q): the diagonal of the column broadcast across, summed along sublanes."""
  q = col.shape[0]
  return jnp.sum(jnp.where(_eye(q), col, jnp.zeros((), col.dtype)), axis=0, keepdims=True)


def last_entry(row: jax.Array) -> jax.Array:
  """(1, q) -> (1, 1): the entry at the last position, by a masked lane reduction."""
  q = row.shape[-1]
  last = lax.broadcasted_iota(jnp.int32, row.shape, 1) == q - 1
  return jnp.sum(jnp.where(last, row, jnp.zeros((), row.dtype)), axis=1, keepdims=True)


def causal_mask(q: int, seg_row: jax.Array | None) -> jax.Array:
  """(q, q) bool: t >= s, and (with chunk-local segment ids (1, q)) seg[t] == seg[s]."""
  rows = lax.broadcasted_iota(jnp.int32, (q, q), 0)
  cols = lax.broadcasted_iota(jnp.int32, (q, q), 1)
  keep = rows >= cols
  if seg_row is not None:
    keep = keep & (row_to_col(seg_row) == seg_row)
  return keep


def decay_mask(cs_row: jax.Array, keep: jax.Array) -> jax.Array:
  """L[t, s] = exp(cs[t] - cs[s]) where ``keep``, else 0 (Mamba-2 §3.2.1, ``exp(segsum)``).

  cs is the within-chunk inclusive cumsum of dt·A (nonincreasing, finite), so every kept
  exponent is <= 0; masked entries are set to -inf before ``exp`` (never NaN). The difference of
  two cumsums costs |cs|·2⁻²⁴ of absolute precision in the exponent, |cs| <= q·max(dt)·|A|
  within one chunk.

  Args:
    cs_row: (1, q) float32.
    keep: (q, q) bool from ``causal_mask``.

  Returns:
    (q, q) float32.
  """
  exponent = row_to_col(cs_row) - cs_row
  return jnp.exp(jnp.where(keep, exponent, jnp.asarray(-jnp.inf, jnp.float32)))
