"""Softmax cross-entropy of integer targets with the argmax accuracy, as Pallas GPU kernels.

The kernel form of ``mamba_jax.ops.cross_entropy.softmax_cross_entropy_with_accuracy``, the
language model's loss. Logits x (r, v_padded), of which only the first ``vocab_size`` (V)
columns are classes (the rest pads the LM head's width), and targets t (r,) in [0, V). Per
row, with the padding columns taken as −inf:

  lse[r]     = log Σ_{j<V} exp(x[r, j])
  loss[r]    = lse[r] − x[r, t[r]]
  correct[r] = [argmax_{j<V} x[r, j] == t[r]]   (the first index of the maximum, as jnp.argmax)

The backward, with g[r] the cotangent of loss[r] (correct has none):

  dx[r, j] = (exp(x[r, j] − lse[r]) − [j == t[r]]) · g[r]   for j < V,   0 for j >= V

Arithmetic in float32 whatever the logits' dtype; loss, lse and correct are float32, dx comes
back in the logits' dtype. A target outside [0, V) is no class: its loss is +inf, it is never
correct, and its row's dx is the softmax times g.

Forward: one program per block of ``block_rows`` rows. It loads the target's logit once, then
walks the first V columns in tiles of ``block_cols`` (a ``fori_loop``; the tiles past V are not
visited) keeping per row the running maximum m, the sum of exp(x − m) rescaled when m grows
(the online softmax normaliser), and the index of the first maximum: a tile's first maximum
replaces it only when the tile's maximum is strictly larger. It writes loss, lse (kept for the
backward) and correct. The logits are read once.

Backward: one program per block of rows; it walks all v_padded columns in tiles, reads the
logits once and writes dx once (zeros in the padding columns), from the row's lse, target and g.

Column indices are not clamped: a tile's columns are an iota from a multiple of ``block_cols``,
which lets Triton see them contiguous and vectorise the loads; the load mask is col < v_padded
(constant over aligned runs when v_padded is a multiple of 8, as an LM head's width is), and
the classes' bound V (often odd: 50277) is applied after the load by a select. The
interpreter gathers masked lanes at clamped indices and replaces them by ``other``, and drops
out-of-range scatters, so the same indices run in both. Blocks are powers of two; rows past the
last and columns past v_padded are masked.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: r rows (the flattened leading axes), v_padded the logits' width, V vocab_size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class CrossEntropyBlocks(NamedTuple):
  """Tiles of a kernel: ``block_rows`` rows per program (a power of two) × ``block_cols``
  columns per step of its loop over the vocabulary (a power of two); ``num_warps`` and
  ``num_stages`` (software pipelining of the loop's loads) for Triton."""
  block_rows: int
  block_cols: int
  num_warps: int
  num_stages: int


# One row per program (its reductions stay inside it, with no partials to combine). Swept on an
# H100 (scripts/sweep_cross_entropy_blocks.py, 32,768 rows x 50,288 bf16 columns, block_cols
# 2048 / 4096 / 8192 x 4 / 8 warps, 2 stages): forward 1.30 ms with 2K-column tiles and 4 warps
# (85 % of the one-read floor; 4K tiles with 8 warps 1.55 ms), backward 2.44 ms with 4K tiles and
# 8 warps (90 % of the read + write floor; the best, 8K tiles, 2.43 ms).
FORWARD_BLOCKS = CrossEntropyBlocks(block_rows=1, block_cols=2048, num_warps=4, num_stages=2)
BACKWARD_BLOCKS = CrossEntropyBlocks(block_rows=1, block_cols=4096, num_warps=8, num_stages=2)


LOG2E = 1.4426950408889634  # log2(e)


def _exp(u: jax.Array) -> jax.Array:
  """exp(u) as 2^(u · log2 e): the Triton lowering takes exp2 to libdevice's __nv_exp2f,
  essentially the hardware's ex2.approx, and exp to __nv_expf, which adds a range reduction
  around it; once per logit, in a kernel that should be bound by memory. Relative error
  about 1e-7 · |u| from rounding u · log2 e."""
  return jnp.exp2(u * LOG2E)


def check_supported(logits: jax.Array) -> str:
  """'' when the kernels take these logits, else a one-line reason (the XLA form takes all)."""
  if jnp.dtype(logits.dtype) not in SUPPORTED_DTYPES:
    return f"the kernels take float32/bfloat16/float16 logits, got {logits.dtype}"
  return ""


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _tile_sizes(n_rows: int, columns: int, blocks: CrossEntropyBlocks) -> tuple[int, int]:
  """(block_rows, block_cols): ``blocks``' tiles, no larger than the next powers of two of the
  rows and of the columns a kernel walks."""
  for name in ("block_rows", "block_cols"):
    size = getattr(blocks, name)
    if size < 1 or size & (size - 1):
      raise ValueError(f"blocks.{name} must be a power of two, got {size}")
  return (min(blocks.block_rows, _next_power_of_2(n_rows)),
          min(blocks.block_cols, _next_power_of_2(columns)))


def _check_arguments(logits: jax.Array, targets: jax.Array, vocab_size: int) -> None:
  why = check_supported(logits)
  if why:
    raise ValueError(why)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape (rows, v_padded), got shape {logits.shape}")
  if targets.shape != logits.shape[:1] or targets.dtype != jnp.int32:
    raise ValueError(f"targets must be int32 of shape (rows,) = {logits.shape[:1]}, got "
                     f"{targets.dtype} of shape {targets.shape}")
  if not 1 <= vocab_size <= logits.shape[1]:
    raise ValueError(f"vocab_size must be in [1, v_padded = {logits.shape[1]}], got "
                     f"{vocab_size}")


def _rows(block_rows: int, n_rows: int) -> tuple[jax.Array, jax.Array]:
  """(indices (block_rows, 1), in-range mask) of this program's rows, not clamped (module
  docstring)."""
  rows = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
  return rows, rows < n_rows


def _load_tile(logits_ref, rows, row_ok, step, block_cols: int, v_padded: int):
  """(columns (1, block_cols), x (block_rows, block_cols) float32) of tile ``step``; x is 0
  past v_padded and in rows past the last."""
  cols = step * block_cols + lax.broadcasted_iota(jnp.int32, (1, block_cols), 1)
  x = pl_triton.load(logits_ref.at[rows, cols], mask=row_ok & (cols < v_padded), other=0.)
  return cols, x.astype(jnp.float32)


def _forward_kernel(logits_ref, targets_ref, loss_ref, lse_ref, correct_ref, *, n_rows: int,
                    vocab_size: int, v_padded: int, block_rows: int, block_cols: int):
  """logits_ref (r, v_padded), targets_ref (r,) int32 -> loss_ref, lse_ref, correct_ref (r,)
  float32 of this program's rows."""
  rows, row_ok = _rows(block_rows, n_rows)
  target = pl_triton.load(targets_ref.at[rows], mask=row_ok, other=0)  # (block_rows, 1)
  is_class = (target >= 0) & (target < vocab_size)
  target_logit = pl_triton.load(logits_ref.at[rows, jnp.clip(target, 0, vocab_size - 1)],
                                mask=row_ok, other=0.).astype(jnp.float32)
  target_logit = jnp.where(is_class, target_logit, -jnp.inf)

  def step(k, carry):
    run_max, run_sum, run_arg = carry
    cols, x = _load_tile(logits_ref, rows, row_ok, k.astype(jnp.int32), block_cols, v_padded)
    x = jnp.where(cols < vocab_size, x, -jnp.inf)
    tile_max = jnp.max(x, axis=1, keepdims=True)
    tile_arg = jnp.min(jnp.where(x == tile_max, cols, v_padded), axis=1, keepdims=True)
    new_max = jnp.maximum(run_max, tile_max)
    # The exponent's shift: the running maximum, or 0 while it is −inf (no finite logit yet),
    # where exp(x − m) would be exp(−inf + inf).
    shift = jnp.where(new_max == -jnp.inf, 0., new_max)
    run_sum = (run_sum * _exp(run_max - shift)
               + jnp.sum(_exp(x - shift), axis=1, keepdims=True))
    run_arg = jnp.where(tile_max > run_max, tile_arg, run_arg)
    return new_max, run_sum, run_arg

  per_row = lambda value, dtype: jnp.full((block_rows, 1), value, dtype)
  run_max, run_sum, run_arg = lax.fori_loop(
      0, pl.cdiv(vocab_size, block_cols), step,
      (per_row(-jnp.inf, jnp.float32), per_row(0., jnp.float32), per_row(0, jnp.int32)))
  lse = run_max + jnp.log(run_sum)
  pl_triton.store(loss_ref.at[rows], lse - target_logit, mask=row_ok)
  pl_triton.store(lse_ref.at[rows], lse, mask=row_ok)
  pl_triton.store(correct_ref.at[rows], (run_arg == target).astype(jnp.float32), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("vocab_size", "interpret", "blocks"))
def cross_entropy_fwd(logits: jax.Array, targets: jax.Array, *, vocab_size: int,
                      interpret: bool = False, blocks: CrossEntropyBlocks = FORWARD_BLOCKS
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The module docstring's forward.

  Args:
    logits: (r, v_padded) float32/bfloat16/float16.
    targets: (r,) int32, the class of each row in [0, vocab_size).
    vocab_size: V, the leading columns that are classes, 1 <= V <= v_padded.
    interpret: run in the Pallas interpreter (CPU).
    blocks: rows per program, columns per tile, warps and stages.

  Returns:
    (loss, lse, correct), each (r,) float32.
  """
  _check_arguments(logits, targets, vocab_size)
  n_rows, v_padded = logits.shape
  if n_rows == 0:
    empty = jnp.zeros((0,), jnp.float32)
    return empty, empty, empty
  block_rows, block_cols = _tile_sizes(n_rows, vocab_size, blocks)
  kernel = functools.partial(_forward_kernel, n_rows=n_rows, vocab_size=vocab_size,
                             v_padded=v_padded, block_rows=block_rows, block_cols=block_cols)
  per_row = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n_rows, block_rows),),
      out_shape=[per_row, per_row, per_row],
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="cross_entropy_fwd",
  )(logits, targets)


def _backward_kernel(logits_ref, targets_ref, lse_ref, dloss_ref, dlogits_ref, *, n_rows: int,
                     vocab_size: int, v_padded: int, block_rows: int, block_cols: int):
  """logits_ref (r, v_padded), targets_ref (r,) int32, lse_ref and dloss_ref (r,) float32 ->
  dlogits_ref (r, v_padded) of this program's rows."""
  rows, row_ok = _rows(block_rows, n_rows)
  target = pl_triton.load(targets_ref.at[rows], mask=row_ok, other=0)  # (block_rows, 1)
  lse = pl_triton.load(lse_ref.at[rows], mask=row_ok, other=0.)
  dloss = pl_triton.load(dloss_ref.at[rows], mask=row_ok, other=0.)

  def step(k, _):
    cols, x = _load_tile(logits_ref, rows, row_ok, k.astype(jnp.int32), block_cols, v_padded)
    dx = (_exp(x - lse) - jnp.where(cols == target, 1., 0.)) * dloss
    dx = jnp.where(cols < vocab_size, dx, 0.)
    pl_triton.store(dlogits_ref.at[rows, cols], dx.astype(dlogits_ref.dtype),
                    mask=row_ok & (cols < v_padded))

  lax.fori_loop(0, pl.cdiv(v_padded, block_cols), step, None)


@functools.partial(jax.jit, static_argnames=("vocab_size", "interpret", "blocks"))
def cross_entropy_bwd(logits: jax.Array, targets: jax.Array, lse: jax.Array,
                      dloss: jax.Array, *, vocab_size: int, interpret: bool = False,
                      blocks: CrossEntropyBlocks = BACKWARD_BLOCKS) -> jax.Array:
  """The module docstring's backward.

  Args:
    logits: (r, v_padded), targets: (r,) int32, vocab_size: as given to the forward.
    lse: (r,) float32 from ``cross_entropy_fwd``.
    dloss: (r,) float32, the cotangent g of the loss.
    interpret: run in the Pallas interpreter (CPU).
    blocks: rows per program, columns per tile, warps and stages.

  Returns:
    dlogits (r, v_padded) in the logits' dtype, zero in columns >= vocab_size.
  """
  _check_arguments(logits, targets, vocab_size)
  n_rows, v_padded = logits.shape
  for name, a in (("lse", lse), ("dloss", dloss)):
    if a.shape != (n_rows,) or a.dtype != jnp.float32:
      raise ValueError(f"{name} must be float32 of shape (rows,) = {(n_rows,)}, got "
                       f"{a.dtype} of shape {a.shape}")
  if n_rows == 0:
    return jnp.zeros_like(logits)
  block_rows, block_cols = _tile_sizes(n_rows, v_padded, blocks)
  kernel = functools.partial(_backward_kernel, n_rows=n_rows, vocab_size=vocab_size,
                             v_padded=v_padded, block_rows=block_rows, block_cols=block_cols)
  return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n_rows, block_rows),),
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="cross_entropy_bwd",
  )(logits, targets, lse, dloss)
