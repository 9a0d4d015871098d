"""SSD backward: gradients of x, dt, B, C and D within each chunk, Pallas GPU kernels.

Mamba-2 (Dao & Gu, 2024), Sec. 6, differentiated by hand. Per (b, c, h), with L_ts =
exp(cs_t - cs_s) for s <= t (same sequence), dS = gradient of the chunk's own state (from the
reverse state passing), dte_s = exp(cs_last - cs_s) (same sequence as the chunk end), dy the
cotangent of y (already through the gate) and G_ts = dy_t . x_s:

  dx kernel (rows s):   U_s   = sum_{t >= s} (B_s . C_t) L_ts dy_t + dte_s dS B_s
                        dx_s  = dt_s U_s + D dy_s,    ddt_s = x_s . U_s,   dD += dy_s x_s
  dB kernel (rows s):   dB_s  = sum_h [ sum_{t >= s} L_ts dt_s G_ts C_t + dte_s dt_s dS^T x_s ]
  dC kernel (rows t):   dC_t  = sum_h [ sum_{s <= t} L_ts dt_s G_ts B_s + w_off_t H[c-1]^T dy_t ]

The dB and dC kernels loop over the heads of one group (B and C are shared by them; a group
whose head count is not a power of two runs as several power-of-two blocks, ``head_split``,
whose partial sums are added after the kernel) and also
return, per head, r_B[s] = <dB^(h)_s, B_s> and r_C[t] = <dC^(h)_t, C_t>: the gradient of the
within-chunk cumulative log-decay is dcs_t = r_C[t] - r_B[t] (+ the chunk-end term from the
state passing), because every decay factor exp(cs_t - cs_s) enters through exactly these dot
products.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. Decays in float32,
matmuls in the input dtype with float32 accumulation (IEEE for float32).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes
from pallas_kernels.gpu.ssd_chunk_scan import causal_decay
from pallas_kernels.gpu.ssd_chunk_state import mm


def _put_row(rows, i, row):
  """rows with row i replaced by ``row``, as a select: the per-head rows stay in registers
  and the (heads, block) output block is stored once."""
  hit = lax.broadcasted_iota(jnp.int32, rows.shape, 0) == i
  return jnp.where(hit, row[None, :], rows)


def _dx_kernel(*refs, has_d: bool, has_seq: bool, chunk_size: int, block_m: int,
               block_k: int):
  refs = list(refs)
  x_ref, dy_ref, b_ref, c_ref, dt_ref, cs_ref, dte_ref, ds_ref = refs[:8]
  rest = refs[8:]
  d_ref = rest.pop(0) if has_d else None
  seq_ref = rest.pop(0) if has_seq else None
  dx_ref, ddt_ref, dd_ref = rest

  s0 = pl.program_id(1) * block_m
  rows = pl.ds(s0, block_m)
  bb = b_ref[rows, :]
  cs_s = cs_ref[rows]
  seq_s = seq_ref[rows] if has_seq else None
  u = mm(bb, ds_ref[...].astype(bb.dtype), 1, 1) * dte_ref[rows][:, None]

  def body(k, u):
    t0 = k * block_k
    cols = pl.ds(t0, block_k)
    cb_t = mm(c_ref[cols, :], bb, 1, 1)
    dec = causal_decay(cs_ref[cols], cs_s, t0, s0,
                       seq_ref[cols] if has_seq else None, seq_s)
    return u + mm((cb_t * dec).astype(dy_ref.dtype), dy_ref[cols, :], 0, 0)

  u = lax.fori_loop(s0 // block_k, chunk_size // block_k, body, u)
  xs = x_ref[rows, :].astype(jnp.float32)
  dys = dy_ref[rows, :].astype(jnp.float32)
  dx = dt_ref[rows][:, None] * u
  if has_d:
    dx = dx + d_ref[...][None, :] * dys
  dx_ref[...] = dx.astype(dx_ref.dtype)
  ddt_ref[...] = jnp.sum(xs * u, axis=1)
  dd_ref[...] = jnp.sum(dys * xs, axis=0)


def _db_kernel(*refs, has_seq: bool, chunk_size: int, block_m: int, block_k: int,
               per_group: int):
  refs = list(refs)
  x_ref, dy_ref, b_ref, c_ref, dt_ref, cs_ref, dte_ref, ds_ref = refs[:8]
  rest = refs[8:]
  seq_ref = rest.pop(0) if has_seq else None
  db_ref, r_ref = rest

  s0 = pl.program_id(1) * block_m
  rows = pl.ds(s0, block_m)
  # b_ref's block is already this program's rows (``rows_of="b"``): index it whole. Indexing it
  # at ``rows`` again reads past the block on the GPU, which interpret mode hides by clamping.
  bb = b_ref[...].astype(jnp.float32)
  seq_s = seq_ref[rows] if has_seq else None
  k0 = s0 // block_k

  def head(hh, carry):
    db, r = carry
    xs = x_ref[rows, hh, :]
    cs_s = cs_ref[hh, rows]
    dt_s = dt_ref[hh, rows]
    acc = mm(xs, ds_ref[hh].astype(xs.dtype), 1, 0) * (dte_ref[hh, rows] * dt_s)[:, None]

    def body(k, acc):
      t0 = k * block_k
      cols = pl.ds(t0, block_k)
      g_t = mm(dy_ref[cols, hh, :], xs, 1, 1)
      dec = causal_decay(cs_ref[hh, cols], cs_s, t0, s0,
                         seq_ref[cols] if has_seq else None, seq_s)
      w = (g_t * dec * dt_s[None, :]).astype(c_ref.dtype)
      return acc + mm(w, c_ref[cols, :], 0, 0)

    acc = lax.fori_loop(k0, chunk_size // block_k, body, acc)
    return db + acc, _put_row(r, hh, jnp.sum(acc * bb, axis=1))

  db, r = lax.fori_loop(0, per_group, head, (jnp.zeros(bb.shape, jnp.float32),
                                             jnp.zeros((per_group, block_m), jnp.float32)))
  db_ref[...] = db.astype(db_ref.dtype)
  r_ref[...] = r


def _dc_kernel(*refs, has_seq: bool, block_m: int, block_k: int, per_group: int):
  refs = list(refs)
  x_ref, dy_ref, b_ref, c_ref, dt_ref, cs_ref, woff_ref, prev_ref = refs[:8]
  rest = refs[8:]
  seq_ref = rest.pop(0) if has_seq else None
  dc_ref, r_ref = rest

  t0 = pl.program_id(1) * block_m
  rows = pl.ds(t0, block_m)
  cc = c_ref[...].astype(jnp.float32)  # already this program's rows (``rows_of="c"``)
  seq_t = seq_ref[rows] if has_seq else None
  num_k = (t0 + block_m + block_k - 1) // block_k

  def head(hh, carry):
    dc, r = carry
    dyt = dy_ref[rows, hh, :]
    cs_t = cs_ref[hh, rows]
    acc = mm(dyt, prev_ref[hh].astype(dyt.dtype), 1, 0) * woff_ref[hh, rows][:, None]

    def body(k, acc):
      s0 = k * block_k
      cols = pl.ds(s0, block_k)
      g = mm(dyt, x_ref[cols, hh, :], 1, 1)
      dec = causal_decay(cs_t, cs_ref[hh, cols], t0, s0, seq_t,
                         seq_ref[cols] if has_seq else None)
      w = (g * dec * dt_ref[hh, cols][None, :]).astype(b_ref.dtype)
      return acc + mm(w, b_ref[cols, :], 1, 0)

    acc = lax.fori_loop(0, num_k, body, acc)
    return dc + acc, _put_row(r, hh, jnp.sum(acc * cc, axis=1))

  dc, r = lax.fori_loop(0, per_group, head, (jnp.zeros(cc.shape, jnp.float32),
                                             jnp.zeros((per_group, block_m), jnp.float32)))
  dc_ref[...] = dc.astype(dc_ref.dtype)
  r_ref[...] = r


def shapes(x, b, dt, chunk_size, blocks):
  """(b, l, h, p, g, n) of the backward's inputs, checked against the chunk and blocks."""
  batch, length, heads, head_dim = x.shape
  groups, state = b.shape[2:]
  if length % chunk_size:
    raise ValueError(f"{length=} must be a multiple of {chunk_size=}")
  blocks.check(chunk_size, head_dim, state)
  if dt.shape != (batch, heads, length) or dt.dtype != jnp.float32:
    raise ValueError(f"dt has shape {dt.shape} dtype {dt.dtype}; expected "
                     f"({batch}, {heads}, {length}) float32")
  return batch, length, heads, head_dim, groups, state


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def ssd_bwd_dx(x, dy, b, c, dt, cs, dte, dstates, d=None, seq_idx=None, *, chunk_size: int,
               blocks: SSDBlockSizes, interpret: bool = False):
  """dx, the direct part of ddt, and dD (see the module docstring).

  Args:
    x, dy: (b, l, h, p); b, c: (b, l, g, n); dt, cs, dte: (b, h, l) float32;
    dstates: (b, c, h, p, n) float32; d: (h, p) float32 or None; seq_idx: (b, l) int32 or None.

  Returns:
    dx (b, l, h, p) in x's dtype; ddt (b, h, l) float32 (without the decay's share);
    dD (h, p) float32 summed over batch and positions.
  """
  batch, length, heads, head_dim, groups, state = shapes(x, b, dt, chunk_size, blocks)
  per_group = heads // groups
  bm, q = blocks.block_m, chunk_size
  nm, chunks = q // bm, length // q
  full = lambda w, hd: pl.BlockSpec((None, q, None, w), lambda h, m, ci, bi: (bi, ci, hd(h), 0))
  rows = pl.BlockSpec((None, bm, None, head_dim), lambda h, m, ci, bi: (bi, ci * nm + m, h, 0))
  vec = pl.BlockSpec((None, None, q), lambda h, m, ci, bi: (bi, h, ci))
  in_specs = [full(head_dim, lambda h: h), full(head_dim, lambda h: h),
              full(state, lambda h: h // per_group), full(state, lambda h: h // per_group),
              vec, vec, vec,
              pl.BlockSpec((None, None, None, head_dim, state),
                           lambda h, m, ci, bi: (bi, ci, h, 0, 0))]
  args = [x, dy, b, c, dt, cs, dte, dstates]
  if d is not None:
    in_specs.append(pl.BlockSpec((None, head_dim), lambda h, m, ci, bi: (h, 0)))
    args.append(d)
  if seq_idx is not None:
    in_specs.append(pl.BlockSpec((None, q), lambda h, m, ci, bi: (bi, ci)))
    args.append(seq_idx)
  kernel = functools.partial(_dx_kernel, has_d=d is not None, has_seq=seq_idx is not None,
                             chunk_size=q, block_m=bm, block_k=blocks.block_k)
  dx, ddt, dd = pl.pallas_call(
      kernel,
      grid=(heads, nm, chunks, batch),
      in_specs=in_specs,
      out_specs=[rows,
                 pl.BlockSpec((None, None, bm), lambda h, m, ci, bi: (bi, h, ci * nm + m)),
                 pl.BlockSpec((None, None, None, head_dim),
                              lambda h, m, ci, bi: (bi, h, ci * nm + m, 0))],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, chunks * nm, head_dim), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps_bwd,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_bwd_dx",
  )(*args)
  return dx, ddt, jnp.sum(dd, axis=(0, 2))


def head_split(per_group: int) -> tuple[int, int]:
  """(heads per block, blocks per group) of the dB / dC kernels (and ``ssd_bwd_shared_w``'s): a
  block is the largest power of two dividing a group's heads (the Triton lowering tiles in
  powers of two), so 24 heads per group run as 3 blocks of 8 whose partial dB / dC are summed
  after the kernel."""
  sub = per_group & -per_group
  return sub, per_group // sub


def grouped_inputs(x, dy, b, c, dt, cs, w, states, seq_idx, *, rows_of: str, chunk_size: int,
                   block_m: int):
  """(in_specs, args) of a kernel on the grid (head blocks v, row blocks m, chunks, batch):
  x and dy (q, sub, p) of head block v; B and C (q, n) of its group, the one named by
  ``rows_of`` only this program's (block_m, n) rows; dt, cs and w (sub, q); states
  (sub, p, n) of chunk ci; seq_idx (q,) when given."""
  batch, length, heads, head_dim = x.shape
  groups, state = b.shape[2:]
  sub, split = head_split(heads // groups)
  q, nm = chunk_size, chunk_size // block_m
  # Grid axis 0 walks head blocks v (sub heads each); block v reads B / C of group v // split.
  heads_full = pl.BlockSpec((None, q, sub, head_dim), lambda v, m, ci, bi: (bi, ci, v, 0))
  full = pl.BlockSpec((None, q, None, state), lambda v, m, ci, bi: (bi, ci, v // split, 0))
  rows = pl.BlockSpec((None, block_m, None, state),
                      lambda v, m, ci, bi: (bi, ci * nm + m, v // split, 0))
  vec = pl.BlockSpec((None, sub, q), lambda v, m, ci, bi: (bi, v, ci))
  in_specs = [heads_full, heads_full,
              rows if rows_of == "b" else full, rows if rows_of == "c" else full,
              vec, vec, vec,
              pl.BlockSpec((None, None, sub, head_dim, state),
                           lambda v, m, ci, bi: (bi, ci, v, 0, 0))]
  args = [x, dy, b, c, dt, cs, w, states]
  if seq_idx is not None:
    in_specs.append(pl.BlockSpec((None, q), lambda v, m, ci, bi: (bi, ci)))
    args.append(seq_idx)
  return in_specs, args


def sum_head_blocks(v, groups: int, split: int, dtype):
  """(..., groups * split, n) per-head-block partials -> (..., groups, n) in ``dtype``."""
  if split == 1:
    return v
  return jnp.sum(v.reshape(*v.shape[:-2], groups, split, v.shape[-1]), axis=-2).astype(dtype)


def _grouped_call(kernel, x, dy, b, c, dt, cs, w, states, seq_idx, *, rows_of: str,
                  chunk_size: int, blocks: SSDBlockSizes, interpret: bool, name: str):
  batch, length, heads, head_dim, groups, state = shapes(x, b, dt, chunk_size, blocks)
  sub, split = head_split(heads // groups)
  bm, q = blocks.block_m, chunk_size
  nm, chunks = q // bm, length // q
  in_specs, args = grouped_inputs(x, dy, b, c, dt, cs, w, states, seq_idx, rows_of=rows_of,
                                  chunk_size=q, block_m=bm)
  out_dtype = b.dtype if rows_of == "b" else c.dtype
  # With several blocks per group each writes its own float32 partial, summed below.
  partial_dtype = out_dtype if split == 1 else jnp.float32
  grad, r = pl.pallas_call(
      functools.partial(kernel, per_group=sub),
      grid=(groups * split, nm, chunks, batch),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bm, None, state),
                              lambda v, m, ci, bi: (bi, ci * nm + m, v, 0)),
                 pl.BlockSpec((None, sub, bm), lambda v, m, ci, bi: (bi, v, ci * nm + m))],
      out_shape=[jax.ShapeDtypeStruct((batch, length, groups * split, state), partial_dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps_bwd,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name=name,
  )(*args)
  return sum_head_blocks(grad, groups, split, out_dtype), r


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def ssd_bwd_db(x, dy, b, c, dt, cs, dte, dstates, seq_idx=None, *, chunk_size: int,
               blocks: SSDBlockSizes, interpret: bool = False):
  """dB and, per head, r_B[s] = <dB^(h)_s, B_s> (see the module docstring).

  Args: as ``ssd_bwd_dx`` (no D).

  Returns:
    dB (b, l, g, n) in B's dtype; r_B (b, h, l) float32.
  """
  kernel = functools.partial(_db_kernel, has_seq=seq_idx is not None, chunk_size=chunk_size,
                             block_m=blocks.block_m, block_k=blocks.block_k)
  return _grouped_call(kernel, x, dy, b, c, dt, cs, dte, dstates, seq_idx, rows_of="b",
                       chunk_size=chunk_size, blocks=blocks, interpret=interpret,
                       name="ssd_bwd_db")


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def ssd_bwd_dc(x, dy, b, c, dt, cs, w_off, all_states, seq_idx=None, *, chunk_size: int,
               blocks: SSDBlockSizes, interpret: bool = False):
  """dC and, per head, r_C[t] = <dC^(h)_t, C_t> (see the module docstring).

  Args:
    x, dy, b, c, dt, cs, seq_idx: as ``ssd_bwd_dx``; w_off: (b, h, l) float32 exp(cs_t) masked
    by the sequence entering the chunk; all_states: (b, c + 1, h, p, n) float32 (index c is
    the state entering chunk c).

  Returns:
    dC (b, l, g, n) in C's dtype; r_C (b, h, l) float32.
  """
  kernel = functools.partial(_dc_kernel, has_seq=seq_idx is not None,
                             block_m=blocks.block_m, block_k=blocks.block_k)
  return _grouped_call(kernel, x, dy, b, c, dt, cs, w_off, all_states, seq_idx, rows_of="c",
                       chunk_size=chunk_size, blocks=blocks, interpret=interpret,
                       name="ssd_bwd_dc")
