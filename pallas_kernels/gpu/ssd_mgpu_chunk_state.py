"""SSD chunk states on Hopper: one weighted outer-product sum per (b, c, h), a Mosaic GPU kernel.

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, step 2 ("intra-chunk states"):

  S[b, c, h] = sum_{s in chunk c} w[b, h, s] * x[b, s, h, :] (outer) B[b, s, g(h), :]

with w_s = exp(cs_last - cs_s) * dt_s: the same contract as the Triton-lowered
``ssd_chunk_state.chunk_state``. One CTA (one warpgroup) owns a (p, block_n) tile of one
(b, c, h) state and walks the chunk in blocks of 64 positions (a ring of two TMA-loaded x / B
blocks). Per block it scales the x rows by w in float32 registers, stores them in the input
dtype to a swizzled SMEM buffer, and accumulates

  acc += wgmma((w o x_blk)^T, B_blk)         (p x 64) @ (64 x block_n), float32 accumulator,

the transposed operand read straight from SMEM. block_n = n, or 128 when p = 128 and n = 256
(the accumulator stays at most 128 float32 registers per thread).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_mgpu_common import (MATMUL_DTYPES, ROW_VECTOR, ROWS, TILE,
                                                launch_options, smem, wgmma_accumulate)

ACC_ELEMENTS = 128 * 128   # float32 accumulator elements per warpgroup (128 registers/thread)


def state_block_n(head_dim: int, state: int) -> int:
  """Columns of the state each CTA computes."""
  return min(state, ACC_ELEMENTS // head_dim)


def _kernel(x_ref, b_ref, w_ref, out_ref, x_s, b_s, xw_s, w_s, o_s, w_bar, b_bar, x_bar, *,
            chunk_size: int, chunks: int, per_group: int, block_n: int,
            interpret: bool):
  q = chunk_size
  steps = q // ROWS
  dtype = x_ref.dtype
  p = x_ref.shape[-1]
  h = lax.axis_index("h")
  n0 = lax.axis_index("n") * block_n
  bc = lax.axis_index("bc")
  bi = lax.div(bc, jnp.int32(chunks))
  ci = lax.rem(bc, jnp.int32(chunks))
  g = lax.div(h, jnp.int32(per_group))
  chunk0 = ci * q
  cols_n = pl.ds(n0, block_n)

  def load_block(k, slot):
    rows = pl.ds(chunk0 + k * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(b_ref.at[bi, rows, g, cols_n], b_s.at[slot], b_bar.at[slot])
    plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, h], x_s.at[slot], x_bar.at[slot])

  plgpu.copy_gmem_to_smem(w_ref.at[bi, h, pl.ds(chunk0, q)], w_s, w_bar)
  for k in range(min(2, steps)):
    load_block(k, k)
  plgpu.barrier_wait(w_bar)

  def body(k, acc):
    slot = lax.rem(k, jnp.int32(2))
    plgpu.barrier_wait(x_bar.at[slot])
    plgpu.barrier_wait(b_bar.at[slot])
    xk = plgpu.load(x_s.at[slot], layout=TILE).astype(jnp.float32)
    wk = plgpu.load(w_s.at[pl.ds(k * ROWS, ROWS)], layout=ROW_VECTOR)
    xw_s[...] = (xk * lax.broadcast_in_dim(wk, (ROWS, p), [0])).astype(dtype)
    plgpu.commit_smem()
    acc = wgmma_accumulate(acc, xw_s.transpose((1, 0)), b_s.at[slot], interpret)

    @pl.when(k + 2 < steps)
    def _():
      load_block(k + 2, slot)

    return acc

  acc = plgpu.layout_cast(jnp.zeros((p, block_n), jnp.float32), TILE)
  acc = lax.fori_loop(jnp.int32(0), jnp.int32(steps), body, acc)
  o_s[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, out_ref.at[bi, ci, h, :, cols_n])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def chunk_state_mgpu(x: jax.Array, b: jax.Array, w: jax.Array, *, chunk_size: int,
                     interpret: bool = False) -> jax.Array:
  """Per-chunk weighted state sums (Mamba-2 Sec. 6 step 2), on wgmma.

  Args:
    x: (b, l, h, p) bfloat16 / float16; l a multiple of ``chunk_size``; p a multiple of 64.
    b: (b, l, g, n) in x's dtype; h a multiple of g; n a multiple of 64.
    w: (b, h, l) float32 weights per position.
    chunk_size: q, a multiple of 64.
    interpret: run in Mosaic GPU's interpreter (CPU).

  Returns:
    (b, c, h, p, n) float32: S[b, c, h] = sum_s w[b, h, s] x[b, s, h] (outer) b[b, s, g(h)].
  """
  batch, length, heads, head_dim = x.shape
  _, _, groups, state = b.shape
  if x.dtype not in MATMUL_DTYPES or b.dtype != x.dtype:
    raise ValueError(f"x and b must both be bfloat16 or float16, got {x.dtype} and {b.dtype}")
  if chunk_size % ROWS or length % chunk_size:
    raise ValueError(f"{chunk_size=} must be a multiple of {ROWS} dividing {length=}")
  if head_dim % ROWS or state % ROWS or head_dim > 128:
    raise ValueError(f"head_dim p={head_dim} must be 64 or 128 and d_state n={state} a "
                     f"multiple of {ROWS}")
  if b.shape[:2] != (batch, length) or heads % groups:
    raise ValueError(f"b has shape {b.shape}; expected ({batch}, {length}, g, n) with g | {heads}")
  if w.shape != (batch, heads, length) or w.dtype != jnp.float32:
    raise ValueError(f"w has shape {w.shape} dtype {w.dtype}; expected "
                     f"({batch}, {heads}, {length}) float32")
  chunks = length // chunk_size
  block_n = state_block_n(head_dim, state)
  dtype = x.dtype
  scratch = [
      smem((2, ROWS, head_dim), dtype, interpret),       # x blocks (ring)
      smem((2, ROWS, block_n), dtype, interpret),        # B blocks (ring)
      smem((ROWS, head_dim), dtype, interpret),          # w o x of the current block
      plgpu.SMEM((chunk_size,), jnp.float32),            # w of the chunk
      smem((head_dim, block_n), jnp.float32, interpret),  # the state tile, for the TMA store
      plgpu.Barrier(),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
  ]
  kernel = functools.partial(_kernel, chunk_size=chunk_size, chunks=chunks,
                             per_group=heads // groups, block_n=block_n,
                             interpret=interpret)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state), jnp.float32),
      scratch_types=scratch,
      grid=(heads, state // block_n, batch * chunks),
      grid_names=("h", "n", "bc"),
      kernel_name="ssd_chunk_state_mgpu",
      **launch_options(interpret),
  )(x, b, w)
