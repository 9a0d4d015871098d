"""SSD chunk states on Hopper: one weighted outer-product sum per (b, c, h), a Mosaic GPU kernel.

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, step 2 ("intra-chunk states"):

  S[b, c, h] = sum_{s in chunk c} w[b, h, s] * x[b, s, h, :] (outer) B[b, s, g(h), :]

with w_s = exp(cs_last - cs_s) * dt_s: the same contract as the Triton-lowered
``ssd_chunk_state.chunk_state``. One CTA (one warpgroup) owns (p, block_n = min(n, 128))
tiles of the states of up to 4 heads of one group in one (b, c): it loads the group's B columns
of the chunk once, then walks heads x blocks of 64 positions with a ring of two TMA-loaded x
blocks that runs ahead across heads. Per block it scales the x rows by w in float32 registers,
splits w o x into two terms in the input dtype (hi = round(w o x), lo = round(w o x - hi):
x and B are exact in that dtype, so the states come out nearly float32-exact, where rounding
w o x once would leave bf16's 2^-9 relative error in them), stores them to swizzled SMEM, and

  acc += wgmma(hi^T, B_blk) + wgmma(lo^T, B_blk)   (p x 64) @ (64 x block_n), float32,

the transposed operands read straight from SMEM; the head's tile leaves through SMEM by TMA.
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

BLOCK_N = 128      # state columns per CTA: a (p, 128) float32 accumulator, <= 128 registers
SMEM_BYTES = 227 * 1024 - 4096


def _smem_bytes(heads_per_cta: int, p: int, block_n: int, q: int, itemsize: int) -> int:
  """Shared memory of one CTA: B of the chunk, the x ring, w o x (hi, lo), w, the state tile."""
  return ((q * block_n + 2 * ROWS * p + 2 * ROWS * p) * itemsize
          + 4 * (heads_per_cta * q + p * block_n))


def heads_per_cta(per_group: int, p: int, block_n: int, q: int, itemsize: int) -> int:
  """Heads one CTA walks through (4, 2 or 1), sharing its group's B block in SMEM."""
  for hb in (4, 2, 1):
    if per_group % hb == 0 and _smem_bytes(hb, p, block_n, q, itemsize) <= SMEM_BYTES:
      return hb
  raise ValueError(f"head_dim p={p}, chunk_size={q} need "
                   f"{_smem_bytes(1, p, block_n, q, itemsize)} bytes of shared memory")


def _kernel(x_ref, b_ref, w_ref, out_ref, b_s, x_s, hi_s, lo_s, w_s, o_s, b_bar, x_bar, w_bar,
            *, chunk_size: int, chunks: int, per_group: int, heads_per_cta: int, block_n: int,
            interpret: bool):
  q = chunk_size
  steps = q // ROWS
  nh = heads_per_cta
  total = nh * steps
  dtype = x_ref.dtype
  p = x_ref.shape[-1]
  h0 = lax.axis_index("hb") * nh
  cols_n = pl.ds(lax.axis_index("n") * block_n, block_n)
  bc = lax.axis_index("bc")
  bi = lax.div(bc, jnp.int32(chunks))
  ci = lax.rem(bc, jnp.int32(chunks))
  g = lax.div(h0, jnp.int32(per_group))
  chunk0 = ci * q

  def issue(i):
    """Start the TMA load of step i's x block (head i // steps, block i % steps)."""
    slot = lax.rem(i, jnp.int32(2))
    rows = pl.ds(chunk0 + lax.rem(i, jnp.int32(steps)) * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, h0 + lax.div(i, jnp.int32(steps))],
                            x_s.at[slot], x_bar.at[slot])

  for k in range(steps):
    plgpu.copy_gmem_to_smem(b_ref.at[bi, pl.ds(chunk0 + k * ROWS, ROWS), g, cols_n],
                            b_s.at[k], b_bar.at[k])
  plgpu.copy_gmem_to_smem(w_ref.at[bi, pl.ds(h0, nh), pl.ds(chunk0, q)], w_s, w_bar)
  issue(jnp.int32(0))
  if total > 1:
    issue(jnp.int32(1))
  plgpu.barrier_wait(w_bar)
  for k in range(steps):
    plgpu.barrier_wait(b_bar.at[k])

  def head_body(j, carry):
    def step(k, acc):
      i = j * steps + k
      slot = lax.rem(i, jnp.int32(2))
      plgpu.barrier_wait(x_bar.at[slot])
      xk = plgpu.load(x_s.at[slot], layout=TILE).astype(jnp.float32)
      wk = plgpu.load(w_s.at[j, pl.ds(k * ROWS, ROWS)], layout=ROW_VECTOR)
      xw = xk * lax.broadcast_in_dim(wk, (ROWS, p), [0])
      hi = xw.astype(dtype)
      hi_s[...] = hi
      lo_s[...] = (xw - hi.astype(jnp.float32)).astype(dtype)
      plgpu.commit_smem()   # hi / lo visible to wgmma; every thread is done with the x slot

      @pl.when(i + 2 < total)
      def _():
        issue(i + 2)

      acc = wgmma_accumulate(acc, hi_s.transpose((1, 0)), b_s.at[k], interpret)
      return wgmma_accumulate(acc, lo_s.transpose((1, 0)), b_s.at[k], interpret)

    acc = plgpu.layout_cast(jnp.zeros((p, block_n), jnp.float32), TILE)
    acc = lax.fori_loop(jnp.int32(0), jnp.int32(steps), step, acc)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous head's tile is out
    o_s[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, out_ref.at[bi, ci, h0 + j, :, cols_n])
    return carry

  lax.fori_loop(jnp.int32(0), jnp.int32(nh), head_body, jnp.int32(0))
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
  block_n = min(state, BLOCK_N)
  dtype = x.dtype
  nh = heads_per_cta(heads // groups, head_dim, block_n, chunk_size, jnp.dtype(dtype).itemsize)
  scratch = [
      smem((chunk_size // ROWS, ROWS, block_n), dtype, interpret),  # B of the chunk
      smem((2, ROWS, head_dim), dtype, interpret),       # x blocks (ring)
      smem((ROWS, head_dim), dtype, interpret),          # w o x of the block: hi part
      smem((ROWS, head_dim), dtype, interpret),          # and lo part
      plgpu.SMEM((nh, chunk_size), jnp.float32),         # w of the chunk, per head
      smem((head_dim, block_n), jnp.float32, interpret),  # the state tile, for the TMA store
      plgpu.Barrier(num_barriers=chunk_size // ROWS),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(),
  ]
  kernel = functools.partial(_kernel, chunk_size=chunk_size, chunks=chunks,
                             per_group=heads // groups, heads_per_cta=nh, block_n=block_n,
                             interpret=interpret)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state), jnp.float32),
      scratch_types=scratch,
      grid=(state // block_n, heads // nh, batch * chunks),
      grid_names=("n", "hb", "bc"),
      kernel_name="ssd_chunk_state_mgpu",
      **launch_options(interpret),
  )(x, b, w)
