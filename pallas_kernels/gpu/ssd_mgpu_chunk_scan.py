"""SSD chunk scan on Hopper: the outputs of each chunk, a Mosaic GPU (wgmma) Pallas kernel.

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, steps 1 and 4. Within chunk c, for t in the chunk,

  y_t = sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s      (diagonal block, (L o C B^T) X)
      + w_off_t * C_t . H[c - 1]                                  (off-diagonal: state entering c)
      + D x_t,
  out_t = y_t * silu(z_t)                                         (when z is given),

the same contract as the Triton-lowered ``ssd_chunk_scan.chunk_scan_fwd``. One CTA (one
warpgroup) computes a row block of 64 positions t of one (b, c) for up to 4 heads of one group
(``heads_per_cta``: they share the C rows), head after head; per head:

  acc  = wgmma(C_rows, H[c-1]^T) * w_off_t                       (64 x n) @ (n x p)
  for each causal column block s of 64 positions (a ring of two TMA-loaded B / x blocks that
  runs ahead across heads; the next head's H[c-1] and z land while this head computes):
    cb   = wgmma(C_rows, B_s^T)                                   (64 x n) @ (n x 64), float32
    w    = cb * exp(min(cs_t - cs_s, 0)) * dt_s, 0 where s > t or seq_t != seq_s  (float32)
    acc += wgmma(w in the input dtype, x_s)                       (64 x 64) @ (64 x p)
  out  = (acc + D x_t) * silu(z_t), stored through SMEM by TMA.

Decays stay in float32 registers; matmul operands are bf16/f16 with float32 accumulation. The
heavy row blocks (more column blocks) are scheduled first.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_mgpu_common import (COL_VECTOR, MATMUL_DTYPES, ROW_VECTOR, ROWS,
                                                TILE, launch_options, smem, wgmma_accumulate,
                                                wgmma_product)


SMEM_BYTES = 227 * 1024 - 4096   # Hopper's 227 KiB per CTA, less barriers and slack


def _smem_bytes(heads_per_cta: int, p: int, n: int, q: int, itemsize: int) -> int:
  """Shared memory of one CTA: C rows, H[c-1], the B / x rings, the z / output rows, vectors."""
  matrices = ROWS * n + p * n + 2 * ROWS * n + 2 * ROWS * p + ROWS * p
  vectors = 2 * heads_per_cta * q + heads_per_cta * ROWS + q + heads_per_cta * p
  return matrices * itemsize + 4 * vectors


def heads_per_cta(heads: int, per_group: int, p: int, n: int, q: int, itemsize: int) -> int:
  """Heads one CTA walks through (4, 2 or 1): they share a group (one C block) and fit SMEM."""
  for hb in (4, 2, 1):
    if per_group % hb == 0 and _smem_bytes(hb, p, n, q, itemsize) <= SMEM_BYTES:
      return hb
  raise ValueError(f"head_dim p={p}, d_state n={n}, chunk_size={q} need "
                   f"{_smem_bytes(1, p, n, q, itemsize)} bytes of shared memory > {SMEM_BYTES}")


def _kernel(*refs, has_d: bool, has_z: bool, has_seq: bool, chunk_size: int, chunks: int,
            per_group: int, heads_per_cta: int, interpret: bool):
  refs = list(refs)
  x_ref, b_ref, c_ref, dt_ref, cs_ref, woff_ref, prev_ref = refs[:7]
  rest = refs[7:]
  d_ref = rest.pop(0) if has_d else None
  z_ref = rest.pop(0) if has_z else None
  seq_ref = rest.pop(0) if has_seq else None
  y_ref = rest.pop(0)
  (c_s, prev_s, b_s, x_s, cs_s, dt_s, woff_s, seq_s, d_s, yz_s,
   w_s, in_bar, prev_bar, z_bar, b_bar, x_bar) = rest

  q = chunk_size
  nm = q // ROWS
  nh = heads_per_cta
  dtype = x_ref.dtype
  p = x_ref.shape[-1]
  h0 = lax.axis_index("hb") * nh
  m = nm - 1 - lax.axis_index("m")          # the longest row blocks first
  bc = lax.axis_index("bc")
  bi = lax.div(bc, jnp.int32(chunks))
  ci = lax.rem(bc, jnp.int32(chunks))
  g = lax.div(h0, jnp.int32(per_group))
  chunk0 = ci * q
  t0 = m * ROWS
  rows = pl.ds(chunk0 + t0, ROWS)
  heads = pl.ds(h0, nh)
  nk = m + 1                                # causal column blocks per head
  total = nh * nk                           # (head, column block) steps of this CTA

  def issue(i):
    """Start the TMA loads of step i's B and x column blocks into ring slot i % 2."""
    slot = lax.rem(i, jnp.int32(2))
    k = lax.rem(i, nk)
    cols = pl.ds(chunk0 + k * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(b_ref.at[bi, cols, g], b_s.at[slot], b_bar.at[slot])
    plgpu.copy_gmem_to_smem(x_ref.at[bi, cols, h0 + lax.div(i, nk)], x_s.at[slot],
                            x_bar.at[slot])

  loads = [
      (c_ref.at[bi, rows, g], c_s),
      (cs_ref.at[bi, heads, pl.ds(chunk0, q)], cs_s),
      (dt_ref.at[bi, heads, pl.ds(chunk0, q)], dt_s),
      (woff_ref.at[bi, heads, rows], woff_s),
  ]
  if has_seq:
    loads.append((seq_ref.at[bi, pl.ds(chunk0, q)], seq_s))
  if has_d:
    loads.append((d_ref.at[heads], d_s))
  for i, (src, dst) in enumerate(loads):
    plgpu.copy_gmem_to_smem(src, dst, in_bar.at[i])
  plgpu.copy_gmem_to_smem(prev_ref.at[bi, ci, h0], prev_s, prev_bar)
  if has_z:
    plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, h0], yz_s, z_bar)
  issue(jnp.int32(0))

  @pl.when(total > 1)
  def _():
    issue(jnp.int32(1))

  for i in range(len(loads)):
    plgpu.barrier_wait(in_bar.at[i])

  seq_t = plgpu.load(seq_s.at[pl.ds(t0, ROWS)], layout=ROW_VECTOR) if has_seq else None
  t_ids = t0 + plgpu.broadcasted_iota(jnp.int32, (ROWS, ROWS), 0, layout=TILE)
  s_iota = plgpu.broadcasted_iota(jnp.int32, (ROWS, ROWS), 1, layout=TILE)
  row = lambda v: lax.broadcast_in_dim(v, (ROWS, ROWS), [0])
  col = lambda v: lax.broadcast_in_dim(v, (ROWS, ROWS), [1])

  def head_body(j, carry):
    plgpu.barrier_wait(prev_bar)
    acc = wgmma_product(c_s, prev_s.transpose((1, 0)), (ROWS, p))

    @pl.when(j + 1 < nh)
    def _():   # the product has been read out: H[c-1] of the next head may land
      plgpu.copy_gmem_to_smem(prev_ref.at[bi, ci, h0 + j + 1], prev_s, prev_bar)

    woff_t = plgpu.load(woff_s.at[j], layout=ROW_VECTOR)
    acc = acc * lax.broadcast_in_dim(woff_t, (ROWS, p), [0])
    cs_t = plgpu.load(cs_s.at[j, pl.ds(t0, ROWS)], layout=ROW_VECTOR)

    def block_body(k, acc):
      i = j * nk + k
      slot = lax.rem(i, jnp.int32(2))
      plgpu.barrier_wait(b_bar.at[slot])
      plgpu.barrier_wait(x_bar.at[slot])
      cb = wgmma_product(c_s, b_s.at[slot].transpose((1, 0)), (ROWS, ROWS))
      s0 = k * ROWS
      cs_c = plgpu.load(cs_s.at[j, pl.ds(s0, ROWS)], layout=COL_VECTOR)
      dt_c = plgpu.load(dt_s.at[j, pl.ds(s0, ROWS)], layout=COL_VECTOR)
      keep = t_ids >= s0 + s_iota
      if has_seq:
        keep = keep & (row(seq_t) == col(plgpu.load(seq_s.at[pl.ds(s0, ROWS)],
                                                      layout=COL_VECTOR)))
      decay = jnp.exp(jnp.minimum(row(cs_t) - col(cs_c), 0.0))
      w = jnp.where(keep, cb * decay * col(dt_c), 0.0).astype(dtype)
      acc = wgmma_accumulate(acc, w, x_s.at[slot], interpret, w_s)

      @pl.when((k < m) & (i + 2 < total))
      def _():   # the diagonal block's slot is refilled after the epilogue reads x_t from it
        issue(i + 2)

      return acc

    y = lax.fori_loop(jnp.int32(0), nk, block_body, acc)
    last = j * nk + m
    if has_d:
      x_t = plgpu.load(x_s.at[lax.rem(last, jnp.int32(2))], layout=TILE).astype(jnp.float32)
      d = plgpu.load(d_s.at[j], layout=COL_VECTOR)
      y = y + lax.broadcast_in_dim(d, (ROWS, p), [1]) * x_t

    @pl.when(last + 2 < total)
    def _():
      if has_d:
        plgpu.commit_smem()   # every thread has read x_t before TMA refills its slot
      issue(last + 2)

    if has_z:
      plgpu.barrier_wait(z_bar)
      z = plgpu.load(yz_s, layout=TILE).astype(jnp.float32)   # each thread rewrites its own
      y = y * z / (1.0 + jnp.exp(-z))
    else:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous head's rows are out
    yz_s[...] = y.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(yz_s, y_ref.at[bi, rows, h0 + j])
    if has_z:
      @pl.when(j + 1 < nh)
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, h0 + j + 1], yz_s, z_bar)
    return carry

  lax.fori_loop(jnp.int32(0), jnp.int32(nh), head_body, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def chunk_scan_fwd_mgpu(x, b, c, dt, cs, w_off, prev_states, d=None, z=None, seq_idx=None, *,
                        chunk_size: int, interpret: bool = False):
  """SSD outputs from the chunk-boundary states (Mamba-2 Sec. 6 steps 1 and 4), on wgmma.

  Args:
    x: (b, l, h, p) bfloat16 / float16; b, c: (b, l, g, n) in x's dtype; l a multiple of
      ``chunk_size``; p and n multiples of 64.
    dt: (b, h, l) float32 processed steps (0 on padding).
    cs: (b, h, l) float32 within-chunk cumulative sums of dt * A.
    w_off: (b, h, l) float32 exp(cs_t), zeroed where t's sequence differs from the one that
      ends the previous chunk.
    prev_states: (b, c', h, p, n) in x's dtype with c' >= l / chunk_size; index c is the state
      entering chunk c (H[c - 1]).
    d: (h, p) float32 skip weights, or None.
    z: (b, l, h, p) gate in x's dtype, or None.
    seq_idx: (b, l) int32, or None.
    chunk_size: q, a multiple of 64.
    interpret: run in Mosaic GPU's interpreter (CPU).

  Returns:
    (b, l, h, p) in x's dtype: (y + D x) * silu(z).
  """
  batch, length, heads, head_dim = x.shape
  groups, state = b.shape[2:]
  if x.dtype not in MATMUL_DTYPES:
    raise ValueError(f"x dtype {x.dtype} must be bfloat16 or float16 (wgmma operands)")
  if chunk_size % ROWS or length % chunk_size:
    raise ValueError(f"{chunk_size=} must be a multiple of {ROWS} dividing {length=}")
  if head_dim % ROWS or state % ROWS:
    raise ValueError(f"head_dim p={head_dim} and d_state n={state} must be multiples of {ROWS}")
  for name, v in (("dt", dt), ("cs", cs), ("w_off", w_off)):
    if v.shape != (batch, heads, length) or v.dtype != jnp.float32:
      raise ValueError(f"{name} has shape {v.shape} dtype {v.dtype}; expected "
                       f"({batch}, {heads}, {length}) float32")
  chunks = length // chunk_size
  if (prev_states.ndim != 5 or prev_states.shape[0] != batch or prev_states.shape[1] < chunks
      or prev_states.shape[2:] != (heads, head_dim, state) or prev_states.dtype != x.dtype):
    raise ValueError(f"prev_states has shape {prev_states.shape} dtype {prev_states.dtype}; "
                     f"expected ({batch}, >= {chunks}, {heads}, {head_dim}, {state}) {x.dtype}")
  dtype = x.dtype
  q = chunk_size
  args = [x, b, c, dt, cs, w_off, prev_states]
  if d is not None:
    args.append(d)
  if z is not None:
    args.append(z)
  if seq_idx is not None:
    args.append(seq_idx)
  nh = heads_per_cta(heads, heads // groups, head_dim, state, q, jnp.dtype(dtype).itemsize)
  num_loads = 4 + (seq_idx is not None) + (d is not None)
  scratch = [
      smem((ROWS, state), dtype, interpret),                   # C rows
      smem((head_dim, state), dtype, interpret),               # H[c - 1] of the current head
      smem((2, ROWS, state), dtype, interpret),                # B column blocks (ring)
      smem((2, ROWS, head_dim), dtype, interpret),             # x column blocks (ring)
      plgpu.SMEM((nh, q), jnp.float32),                        # cs of the chunk, per head
      plgpu.SMEM((nh, q), jnp.float32),                        # dt of the chunk, per head
      plgpu.SMEM((nh, ROWS), jnp.float32),                     # w_off of the rows, per head
      None if seq_idx is None else plgpu.SMEM((q,), jnp.int32),
      None if d is None else plgpu.SMEM((nh, head_dim), jnp.float32),
      smem((ROWS, head_dim), dtype, interpret),                # z rows, then the output rows
      smem((ROWS, ROWS), dtype, interpret) if interpret else None,  # w, interpreter only
      plgpu.Barrier(num_barriers=num_loads),
      plgpu.Barrier(),
      plgpu.Barrier() if z is not None else None,
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
  ]
  kernel = functools.partial(_kernel, has_d=d is not None, has_z=z is not None,
                             has_seq=seq_idx is not None, chunk_size=q, chunks=chunks,
                             per_group=heads // groups, heads_per_cta=nh,
                             interpret=interpret)
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(x.shape, dtype),
      scratch_types=scratch,
      grid=(q // ROWS, heads // nh, batch * chunks),
      grid_names=("m", "hb", "bc"),
      kernel_name="ssd_chunk_scan_mgpu",
      **launch_options(interpret),
  )(*args)
