"""SSD chunk scan: the output of each chunk, a Pallas GPU kernel (forward, and gate backward).

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, steps 1 and 4. Within chunk c, for t in the chunk,

  y_t = sum_{s <= t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s      (diagonal block, (L o C B^T) X)
      + w_off_t * C_t . H[c - 1]                                  (off-diagonal: state entering c)
      + D x_t,
  out_t = y_t * silu(z_t)                                         (when z is given),

with cs the within-chunk cumulative sum of dt * A, w_off_t = exp(cs_t) and, with ``seq_idx``, the
decays zeroed across sequence boundaries (s and t in different sequences; t's sequence differing
from the one that ends chunk c - 1). Each program computes ``block_m`` rows of one (b, c, h),
walking over the causal ``block_k`` column blocks; C B^T is recomputed per tile (never stored).

``chunk_scan_gate_bwd`` runs the same kernel to recompute y inside the backward when z is given
and returns dy = dout * silu(z) and dz = dout * y * silu'(z), so y is never saved.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. Decays in float32;
matmuls on the tensor cores in the input dtype with float32 accumulation (IEEE for float32).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes
from pallas_kernels.gpu.ssd_chunk_state import mm


def causal_decay(cs_rows, cs_cols, row0, col0, seq_rows=None, seq_cols=None):
  """exp(cs_t - cs_s) on a (rows t) x (cols s) tile where t >= s (and same sequence), else 0."""
  t = row0 + lax.broadcasted_iota(jnp.int32, (cs_rows.shape[0], cs_cols.shape[0]), 0)
  s = col0 + lax.broadcasted_iota(jnp.int32, (cs_rows.shape[0], cs_cols.shape[0]), 1)
  keep = t >= s
  if seq_rows is not None:
    keep = keep & (seq_rows[:, None] == seq_cols[None, :])
  diff = jnp.minimum(cs_rows[:, None] - cs_cols[None, :], 0.0)
  return jnp.where(keep, jnp.exp(diff), 0.0)


def _kernel(*refs, has_d: bool, has_z: bool, has_seq: bool, gate_bwd: bool,
            block_m: int, block_k: int):
  refs = list(refs)
  x_ref, b_ref, c_ref, dt_ref, cs_ref, woff_ref, prev_ref = refs[:7]
  rest = refs[7:]
  d_ref = rest.pop(0) if has_d else None
  z_ref = rest.pop(0) if has_z else None
  seq_ref = rest.pop(0) if has_seq else None
  dout_ref = rest.pop(0) if gate_bwd else None
  out_refs = rest

  t0 = pl.program_id(1) * block_m
  rows = pl.ds(t0, block_m)
  c = c_ref[...]
  cs_t = cs_ref[rows]
  seq_t = seq_ref[rows] if has_seq else None
  acc = mm(c, prev_ref[...].astype(c.dtype), 1, 1) * woff_ref[rows][:, None]

  def body(k, acc):
    s0 = k * block_k
    cols = pl.ds(s0, block_k)
    cb = mm(c, b_ref[cols, :], 1, 1)
    dec = causal_decay(cs_t, cs_ref[cols], t0, s0, seq_t,
                       seq_ref[cols] if has_seq else None)
    weights = (cb * dec * dt_ref[cols][None, :]).astype(x_ref.dtype)
    return acc + mm(weights, x_ref[cols, :], 1, 0)

  num_k = (t0 + block_m + block_k - 1) // block_k
  y = lax.fori_loop(0, num_k, body, acc)
  if has_d:
    y = y + d_ref[...][None, :] * x_ref[rows, :].astype(jnp.float32)
  if not gate_bwd:
    (y_ref,) = out_refs
    if has_z:
      z = z_ref[...].astype(jnp.float32)
      y = y * z / (1.0 + jnp.exp(-z))
    y_ref[...] = y.astype(y_ref.dtype)
    return
  dy_ref, dz_ref = out_refs
  z = z_ref[...].astype(jnp.float32)
  sig = 1.0 / (1.0 + jnp.exp(-z))
  dout = dout_ref[...].astype(jnp.float32)
  dy_ref[...] = (dout * z * sig).astype(dy_ref.dtype)
  dz_ref[...] = (dout * y * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)


def _call(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx, dout, *, chunk_size: int,
          blocks: SSDBlockSizes, interpret: bool):
  batch, length, heads, head_dim = x.shape
  groups, state = b.shape[2:]
  if length % chunk_size:
    raise ValueError(f"{length=} must be a multiple of {chunk_size=}")
  blocks.check(chunk_size, head_dim, state)
  for name, v in (("dt", dt), ("cs", cs), ("w_off", w_off)):
    if v.shape != (batch, heads, length) or v.dtype != jnp.float32:
      raise ValueError(f"{name} has shape {v.shape} dtype {v.dtype}; expected "
                       f"({batch}, {heads}, {length}) float32")
  chunks = length // chunk_size
  if all_states.shape != (batch, chunks + 1, heads, head_dim, state):
    raise ValueError(f"all_states has shape {all_states.shape}; expected "
                     f"({batch}, {chunks + 1}, {heads}, {head_dim}, {state})")
  per_group = heads // groups
  bm, q = blocks.block_m, chunk_size
  nm = q // bm
  full = lambda width: pl.BlockSpec((None, q, None, width), lambda h, m, ci, bi: (bi, ci, h, 0))
  rows = lambda width: pl.BlockSpec((None, bm, None, width),
                                    lambda h, m, ci, bi: (bi, ci * nm + m, h, 0))
  vec = pl.BlockSpec((None, None, q), lambda h, m, ci, bi: (bi, h, ci))
  in_specs = [
      full(head_dim),
      pl.BlockSpec((None, q, None, state), lambda h, m, ci, bi: (bi, ci, h // per_group, 0)),
      pl.BlockSpec((None, bm, None, state),
                   lambda h, m, ci, bi: (bi, ci * nm + m, h // per_group, 0)),
      vec, vec, vec,
      pl.BlockSpec((None, None, None, head_dim, state), lambda h, m, ci, bi: (bi, ci, h, 0, 0)),
  ]
  args = [x, b, c, dt, cs, w_off, all_states]
  if d is not None:
    in_specs.append(pl.BlockSpec((None, head_dim), lambda h, m, ci, bi: (h, 0)))
    args.append(d)
  if z is not None:
    in_specs.append(rows(head_dim))
    args.append(z)
  if seq_idx is not None:
    in_specs.append(pl.BlockSpec((None, q), lambda h, m, ci, bi: (bi, ci)))
    args.append(seq_idx)
  if dout is not None:
    in_specs.append(rows(head_dim))
    args.append(dout)
    out_shape = [jax.ShapeDtypeStruct(x.shape, dout.dtype), jax.ShapeDtypeStruct(z.shape, z.dtype)]
    out_specs = [rows(head_dim), rows(head_dim)]
  else:
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    out_specs = [rows(head_dim)]
  kernel = functools.partial(_kernel, has_d=d is not None, has_z=z is not None,
                             has_seq=seq_idx is not None, gate_bwd=dout is not None,
                             block_m=bm, block_k=blocks.block_k)
  return pl.pallas_call(
      kernel,
      grid=(heads, nm, chunks, batch),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_chunk_scan_gate_bwd" if dout is not None else "ssd_chunk_scan",
  )(*args)


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def chunk_scan_fwd(x, b, c, dt, cs, w_off, all_states, d=None, z=None, seq_idx=None, *,
                   chunk_size: int, blocks: SSDBlockSizes, interpret: bool = False):
  """SSD outputs from the chunk-boundary states, Mamba-2 Sec. 6 steps 1 and 4.

  Args:
    x: (b, l, h, p); b, c: (b, l, g, n) in x's dtype; l a multiple of ``chunk_size``.
    dt: (b, h, l) float32 processed steps (0 on padding).
    cs: (b, h, l) float32 within-chunk cumulative sums of dt * A.
    w_off: (b, h, l) float32 exp(cs_t), zeroed where t's sequence differs from the one that
      ends the previous chunk.
    all_states: (b, c + 1, h, p, n) float32; index c is the state entering chunk c.
    d: (h, p) float32 skip weights, or None.
    z: (b, l, h, p) gate, or None.
    seq_idx: (b, l) int32, or None.
    chunk_size: q; blocks: tile sizes; interpret: Pallas interpreter (CPU).

  Returns:
    (b, l, h, p) in x's dtype: (y + D x) * silu(z).
  """
  (y,) = _call(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx, None,
               chunk_size=chunk_size, blocks=blocks, interpret=interpret)
  return y


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def chunk_scan_gate_bwd(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx, dout, *,
                        chunk_size: int, blocks: SSDBlockSizes, interpret: bool = False):
  """Backward through the gate out = y * silu(z), recomputing y (same arguments as the forward).

  Args:
    dout: (b, l, h, p) cotangent of the output; the rest as in ``chunk_scan_fwd`` (z required).

  Returns:
    dy (b, l, h, p) in dout's dtype: dout * silu(z); dz (b, l, h, p) in z's dtype:
    dout * y * sigmoid(z) * (1 + z (1 - sigmoid(z))).
  """
  if z is None:
    raise ValueError("chunk_scan_gate_bwd needs z")
  dy, dz = _call(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx, dout,
                 chunk_size=chunk_size, blocks=blocks, interpret=interpret)
  return dy, dz
