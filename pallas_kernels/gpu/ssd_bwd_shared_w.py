"""SSD backward through W, the dy x^T products summed over a group's heads: Pallas GPU kernels.

The default dB / dC path of ``ssd_pallas_gpu`` (``bwd="shared_w"``; ``ssd_bwd``'s per-head dB
and dC kernels with ``bwd="per_head"``); dx, ddt and dD come from ``ssd_bwd.ssd_bwd_dx`` either
way. Mamba-2 (Dao & Gu, 2024), Sec. 6, differentiated by hand, in ``ssd_bwd``'s notation
(L_ts = exp(cs_t - cs_s) for s <= t in the same sequence, CB_ts = C_t . B_s,
G^h_ts = dy^h_t . x^h_s, dS the chunk state's gradient, H the state entering the chunk):

  W kernel (rows s):   w^h_ts = L^h_ts dt^h_s G^h_ts,   W_ts = sum_h w^h_ts   (a group's heads)
                       dB_s = sum_{t >= s} W_ts C_t + sum_h dte_s dt_s dS^h^T x^h_s
  dC kernel (rows t):  dC_t = sum_{s <= t} W_ts B_s + sum_h w_off_t H^h^T dy^h_t

dB_s = sum_h sum_t w^h_ts C_t: summing w over the heads first turns the per-head (q, q) x (q, n)
products of dB and dC into one per group. Where a tile of positions t lies wholly after the
program's rows s (e their last row, s <= e < t), the decay factors as L_ts = exp(cs_t - cs_e)
exp(cs_e - cs_s), both factors <= 1 (cs does not increase: A <= 0), so w^h on that tile is one
matmul of row-scaled operands, (exp(cs_t - cs_e) dy_t) . (exp(cs_e - cs_s) dt_s x_s), with no
decay per (t, s) element; only the tiles that meet the diagonal take it per element. The decay
gradient's per-head dot products,

  r_B[s] = <dB^(h)_s, B_s> = sum_t w^h_ts CB_ts + dte_s dt_s <dS^h^T x^h_s, B_s>
  r_C[t] = <dC^(h)_t, C_t> = sum_s w^h_ts CB_ts + w_off_t <H^h^T dy^h_t, C_t>,

come from the W kernel (r_B, and r_C's intra-chunk part per row block of s, summed after it)
and the dC kernel (r_C's state part). A group whose head count is not a power of two runs as
several power-of-two head blocks (``ssd_bwd.head_split``) whose partial W / dB / dC are summed.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. Decays in float32,
matmuls in the input dtype with float32 accumulation (IEEE for float32); the row-scaled operands
are rounded to the input dtype, as mamba_ssm's kernels round theirs. r_B and r_C are the column
and row sums of one and the same w^h * CB tile, so their difference, whose reverse cumulative
sum is the decay gradient, keeps the cancellation that exact arithmetic has.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes
from pallas_kernels.gpu.ssd_bwd import grouped_inputs, head_split, shapes, sum_head_blocks
from pallas_kernels.gpu.ssd_chunk_scan import causal_decay
from pallas_kernels.gpu.ssd_chunk_state import mm


def _w_kernel(*refs, has_seq: bool, chunk_size: int, block_m: int, block_k: int,
              per_block: int):
  refs = list(refs)
  x_ref, dy_ref, b_ref, c_ref, dt_ref, cs_ref, dte_ref, ds_ref = refs[:8]
  rest = refs[8:]
  seq_ref = rest.pop(0) if has_seq else None
  db_ref, w_ref, rb_ref, rc_ref = rest

  s0 = pl.program_id(1) * block_m
  rows = pl.ds(s0, block_m)
  bb = b_ref[...]  # this program's rows s of B (row-block spec)
  b32 = bb.astype(jnp.float32)
  seq_s = seq_ref[rows] if has_seq else None
  k0 = s0 // block_k

  def state_head(hh, db):
    xs = x_ref[rows, hh, :]
    term = mm(xs, ds_ref[hh].astype(xs.dtype), 1, 0) * (
        dte_ref[hh, rows] * dt_ref[hh, rows])[:, None]
    # r_B's rows live in the output block, which the tiles below add to head by head.
    rb_ref[hh, :] = jnp.sum(term * b32, axis=1)
    return db + term

  db = lax.fori_loop(0, per_block, state_head, jnp.zeros(bb.shape, jnp.float32))

  def zero_tile(k, unused):
    # Tiles t < s0 get nothing from these columns s: W and this row block's r_C share are 0.
    cols = pl.ds(k * block_k, block_k)
    w_ref[cols, :] = jnp.zeros((block_k, block_m), w_ref.dtype)
    rc_ref[:, cols] = jnp.zeros((per_block, block_k), jnp.float32)
    return unused

  lax.fori_loop(0, k0, zero_tile, 0)

  def diagonal_w(hh, t0, cols):
    """w^h on a tile that meets the rows s: the decay per element, causally masked."""
    g = mm(dy_ref[cols, hh, :], x_ref[rows, hh, :], 1, 1)
    dec = causal_decay(cs_ref[hh, cols], cs_ref[hh, rows], t0, s0,
                       seq_ref[cols] if has_seq else None, seq_s)
    return g * dec * dt_ref[hh, rows][None, :]

  def later_w(hh, t0, cols):
    """w^h on a tile wholly after the rows s (last row e): L_ts = exp(cs_t - cs_e) *
    exp(cs_e - cs_s) with both factors <= 1, so the decay scales the operands' rows."""
    del t0
    cs_s = cs_ref[hh, rows]
    cs_e = jnp.min(cs_s)  # the last row's: cs does not increase along the chunk (A <= 0)
    to_t = jnp.exp(jnp.minimum(cs_ref[hh, cols] - cs_e, 0.0))
    from_s = jnp.exp(jnp.minimum(cs_e - cs_s, 0.0)) * dt_ref[hh, rows]
    dyt = dy_ref[cols, hh, :]
    xs = x_ref[rows, hh, :]
    dyt = (dyt.astype(jnp.float32) * to_t[:, None]).astype(dyt.dtype)
    xs = (xs.astype(jnp.float32) * from_s[:, None]).astype(xs.dtype)
    w = mm(dyt, xs, 1, 1)
    if has_seq:
      w = jnp.where(seq_ref[cols][:, None] == seq_s[None, :], w, 0.0)
    return w

  def tile(head_w):
    def body(k, db):
      t0 = k * block_k
      cols = pl.ds(t0, block_k)
      c_t = c_ref[cols, :]
      cb = mm(c_t, bb, 1, 1)  # (block_k, block_m) float32: CB_ts

      def head(hh, w_sum):
        w = head_w(hh, t0, cols)
        wcb = w * cb
        rc_ref[hh, cols] = jnp.sum(wcb, axis=1)
        rb_ref[hh, :] += jnp.sum(wcb, axis=0)
        return w_sum + w

      w_sum = lax.fori_loop(0, per_block, head, jnp.zeros((block_k, block_m), jnp.float32))
      w_sum = w_sum.astype(w_ref.dtype)
      w_ref[cols, :] = w_sum
      return db + mm(w_sum.astype(c_t.dtype), c_t, 0, 0)
    return body

  # Tiles k0 .. k1 - 1 meet the rows s0 .. s0 + block_m - 1; tiles from k1 on lie after them.
  k1 = (s0 + block_m + block_k - 1) // block_k
  db = lax.fori_loop(k0, k1, tile(diagonal_w), db)
  db = lax.fori_loop(k1, chunk_size // block_k, tile(later_w), db)
  db_ref[...] = db.astype(db_ref.dtype)


def _dc_kernel(dy_ref, b_ref, c_ref, w_ref, woff_ref, prev_ref, dc_ref, r_ref, *,
               block_m: int, block_k: int, per_block: int):
  t0 = pl.program_id(1) * block_m
  rows = pl.ds(t0, block_m)
  c32 = c_ref[...].astype(jnp.float32)  # this program's rows t of C (row-block spec)

  def state_head(hh, dc):
    dyt = dy_ref[:, hh, :]
    term = mm(dyt, prev_ref[hh].astype(dyt.dtype), 1, 0) * woff_ref[hh, rows][:, None]
    r_ref[hh, :] = jnp.sum(term * c32, axis=1)
    return dc + term

  dc = lax.fori_loop(0, per_block, state_head, jnp.zeros(c32.shape, jnp.float32))

  def body(k, dc):
    # W_ts = 0 for s > t (the W kernel's zero tiles and causal decay), so whole tiles are safe.
    cols = pl.ds(k * block_k, block_k)
    return dc + mm(w_ref[:, cols].astype(b_ref.dtype), b_ref[cols, :], 1, 0)

  dc = lax.fori_loop(0, (t0 + block_m + block_k - 1) // block_k, body, dc)
  dc_ref[...] = dc.astype(dc_ref.dtype)


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def ssd_bwd_w(x, dy, b, c, dt, cs, dte, dstates, seq_idx=None, *, chunk_size: int,
              blocks: SSDBlockSizes, interpret: bool = False):
  """dB, W, r_B and the intra-chunk part of r_C (module docstring).

  Args:
    x, dy: (b, l, h, p); b, c: (b, l, g, n); dt, cs, dte: (b, h, l) float32; dstates:
    (b, c, h, p, n) float32; seq_idx: (b, l) int32 or None.

  Returns:
    dB (b, l, g, n) in B's dtype; W (b, c, g * split, q, q), W[.., t, s] = sum over a head
    block's heads of L_ts dt_s (dy_t . x_s), in x's dtype when split == 1 (one block per
    group), else float32 partials for ``ssd_bwd_dc_from_w``; r_B (b, h, l) float32; r_C's
    intra-chunk part sum_s w^h_ts CB_ts, (b, h, l) float32.
  """
  batch, length, heads, head_dim, groups, state = shapes(x, b, dt, chunk_size, blocks)
  sub, split = head_split(heads // groups)
  bm, q = blocks.block_m, chunk_size
  nm, chunks = q // bm, length // q
  in_specs, args = grouped_inputs(x, dy, b, c, dt, cs, dte, dstates, seq_idx, rows_of="b",
                                  chunk_size=q, block_m=bm)
  part_dtype = lambda dtype: dtype if split == 1 else jnp.float32
  kernel = functools.partial(_w_kernel, has_seq=seq_idx is not None, chunk_size=q,
                             block_m=bm, block_k=blocks.block_k, per_block=sub)
  db, w, r_b, r_c = pl.pallas_call(
      kernel,
      grid=(groups * split, nm, chunks, batch),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bm, None, state),
                              lambda v, m, ci, bi: (bi, ci * nm + m, v, 0)),
                 pl.BlockSpec((None, None, None, q, bm), lambda v, m, ci, bi: (bi, ci, v, 0, m)),
                 pl.BlockSpec((None, sub, bm), lambda v, m, ci, bi: (bi, v, ci * nm + m)),
                 pl.BlockSpec((None, sub, None, q), lambda v, m, ci, bi: (bi, v, m, ci))],
      out_shape=[jax.ShapeDtypeStruct((batch, length, groups * split, state),
                                      part_dtype(b.dtype)),
                 jax.ShapeDtypeStruct((batch, chunks, groups * split, q, q), part_dtype(x.dtype)),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, nm, length), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps_bwd,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_bwd_w",
  )(*args)
  return sum_head_blocks(db, groups, split, b.dtype), w, r_b, jnp.sum(r_c, axis=2)


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def ssd_bwd_dc_from_w(dy, b, c, w, w_off, all_states, *, chunk_size: int, blocks: SSDBlockSizes,
               interpret: bool = False):
  """dC and r_C's state part (module docstring).

  Args:
    dy: (b, l, h, p); b, c: (b, l, g, n); w: ``ssd_bwd_w``'s W; w_off: (b, h, l) float32
    exp(cs_t) masked by the sequence entering the chunk; all_states: (b, c + 1, h, p, n)
    float32 (index c is the state entering chunk c).

  Returns:
    dC (b, l, g, n) in C's dtype; w_off_t <H^h^T dy^h_t, C_t>, (b, h, l) float32.
  """
  batch, length, heads, head_dim = dy.shape
  groups, state = b.shape[2:]
  sub, split = head_split(heads // groups)
  bm, q = blocks.block_m, chunk_size
  nm, chunks = q // bm, length // q
  row_block = pl.BlockSpec((None, bm, None, state),
                           lambda v, m, ci, bi: (bi, ci * nm + m, v // split, 0))
  dc, r = pl.pallas_call(
      functools.partial(_dc_kernel, block_m=bm, block_k=blocks.block_k, per_block=sub),
      grid=(groups * split, nm, chunks, batch),
      in_specs=[pl.BlockSpec((None, bm, sub, head_dim),
                             lambda v, m, ci, bi: (bi, ci * nm + m, v, 0)),
                pl.BlockSpec((None, q, None, state), lambda v, m, ci, bi: (bi, ci, v // split, 0)),
                row_block,
                pl.BlockSpec((None, None, None, bm, q), lambda v, m, ci, bi: (bi, ci, v, m, 0)),
                pl.BlockSpec((None, sub, q), lambda v, m, ci, bi: (bi, v, ci)),
                pl.BlockSpec((None, None, sub, head_dim, state),
                             lambda v, m, ci, bi: (bi, ci, v, 0, 0))],
      out_specs=[pl.BlockSpec((None, bm, None, state),
                              lambda v, m, ci, bi: (bi, ci * nm + m, v, 0)),
                 pl.BlockSpec((None, sub, bm), lambda v, m, ci, bi: (bi, v, ci * nm + m))],
      out_shape=[jax.ShapeDtypeStruct((batch, length, groups * split, state),
                                      c.dtype if split == 1 else jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps_bwd,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_bwd_dc_from_w",
  )(dy, b, c, w, w_off, all_states)
  return sum_head_blocks(dc, groups, split, c.dtype), r
