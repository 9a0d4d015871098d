"""The backward SSD (Mamba-2) chunk loop as one Pallas Mosaic TPU kernel.

The backward of the linear recurrence h_c = λ_c h_{c-1} + S_c is the same recurrence run in
reverse, dh_{c-1} = λ_c dh_c + (read-out terms of chunk c). Per (batch row, block of heads of
one group) the kernel walks the chunks from last to first, carrying dh (p, n) float32 in VMEM
scratch (initialised with the final-state cotangent), and recomputes each chunk's forward from
its saved entering state h_{c-1} (the only residual besides the inputs). With the notation of
``ssd_fwd`` (W = (C Bᵀ) ∘ L ∘ dtᵀ, λ = w_in[q-1], dy the cotangent of the ungated output):

  gate          dz = dout · y · silu'(z),  dy = dout · silu(z)          (y recomputed when z)
  skip          dD += Σ_t dy ∘ X,  dX = D ∘ dy
  diagonal      dW = dy Xᵀ,  dX += Wᵀ dy,  G = dW ∘ (C Bᵀ) ∘ L
                d(C Bᵀ) += dW ∘ L ∘ dtᵀ,  ddt_s = Σ_t G[t, s],
                dcs_t += Σ_s G[t, s] dt_s,  dcs_s -= Σ_t G[t, s] dt_s
  read-out      dw_in_t = Σ_p dy ∘ (C h_{c-1}ᵀ),  dC += (w_in ∘ dy) h_{c-1},
                dh_{c-1} = (w_in ∘ dy)ᵀ C
  state update  dh_{c-1} += λ dh_c,  dλ = Σ dh_c ∘ h_{c-1},  dXw = B dh_cᵀ,
                dX += w_out ∘ dXw,  dw_out_t = Σ_p dXw ∘ X,  dB += (w_out ∘ X) dh_c
  per block     dC += d(C Bᵀ) B,  dB += d(C Bᵀ)ᵀ C       (summed over the block's heads first)

dλ is added to dw_in at the chunk's last position (λ is that entry). The per-position
gradients (dcs, ddt, dw_in, dw_out) leave as rows of a (b, h, c, 4, q) block; the wrapper's
autodiff turns them into dt, A and dt_bias gradients. The kernel writes dB and dC per head block
and dD per batch row; ``ssd_bwd`` sums them over a group's blocks and over the batch in XLA.

Matmul operands are in the input dtype (float32 ones at full precision), accumulation float32,
as in the forward. Speed on a real TPU is unmeasured (run only in the TPU interpreter).

Shape legend: b batch, l padded length, c chunks, q chunk size, h heads, g groups, r heads per
block, p head_dim, n d_state.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.tpu import ssd_tiles
from pallas_kernels.tpu.ssd_blocks import (CS, DCS, DDT, DT, DVEC_ROWS, DW_IN, DW_OUT, SEG,
                                           VEC_ROWS, W_IN, W_OUT, SSDTpuBlockSizes)
from pallas_kernels.tpu.ssd_fwd import matmul_dtype


def _ssd_bwd_kernel(*refs, has_d: bool, has_z: bool, has_init: bool, has_seq: bool):
  """One (b, head block, chunk from the end) step; refs in the order built by ``ssd_bwd``.

  Inputs x_ref, z_ref, dout_ref (r, q, p); b_ref, c_ref (q, n); vec_ref (r, 5, q);
  d_ref (r, 1, p); states_ref (r, p, n) (the state entering this chunk); dfinal_ref (r, p, n).
  Outputs dx_ref, dz_ref (r, q, p); db_ref, dc_ref (q, n) float32; dvec_ref (r, 4, q);
  dd_ref (r, 1, p) (accumulated over chunks); dinit_ref (r, p, n). Scratch dh_ref (r, p, n)
  float32, the carried state cotangent, and dscores_ref (q, q) float32, d(C Bᵀ) summed over the
  block's heads; dB and dC accumulate over the heads in their output blocks.
  """
  refs = list(refs)
  x_ref, b_ref, c_ref, vec_ref = refs[:4]
  del refs[:4]
  d_ref = refs.pop(0) if has_d else None
  z_ref = refs.pop(0) if has_z else None
  states_ref, dfinal_ref, dout_ref, dx_ref = refs[:4]
  del refs[:4]
  dz_ref = refs.pop(0) if has_z else None
  db_ref, dc_ref, dvec_ref = refs[:3]
  del refs[:3]
  dd_ref = refs.pop(0) if has_d else None
  dinit_ref = refs.pop(0) if has_init else None
  dh_ref, dscores_ref = refs

  step = pl.program_id(2)
  heads, q, _ = x_ref.shape
  mm = matmul_dtype(x_ref.dtype)

  @pl.when(step == 0)
  def _():
    dh_ref[...] = dfinal_ref[...]
    if has_d:
      dd_ref[...] = jnp.zeros_like(dd_ref)

  b = b_ref[...].astype(mm)
  c = c_ref[...].astype(mm)
  keep = ssd_tiles.causal_mask(q, vec_ref[0, SEG:SEG + 1, :] if has_seq else None)
  scores = jnp.where(keep, ssd_tiles.matmul(c, b, 1, 1), 0.0)  # (q, q): C_t · B_s
  last = lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1
  dscores_ref[...] = jnp.zeros_like(dscores_ref)
  db_ref[...] = jnp.zeros_like(db_ref)
  dc_ref[...] = jnp.zeros_like(dc_ref)

  def head(i, carry):
    vec = vec_ref[i]  # (5, q)
    dt_row = vec[DT:DT + 1]
    w_in_row = vec[W_IN:W_IN + 1]
    w_in = ssd_tiles.row_to_col(w_in_row)
    w_out = ssd_tiles.row_to_col(vec[W_OUT:W_OUT + 1])
    x = x_ref[i].astype(jnp.float32)  # (q, p)
    xm = x.astype(mm)
    h_prev = states_ref[i]  # (p, n)
    h_prev_m = h_prev.astype(mm)
    dh = dh_ref[i]  # (p, n), cotangent of the state leaving this chunk
    dh_m = dh.astype(mm)
    decay = ssd_tiles.decay_mask(vec[CS:CS + 1], keep)
    weights = scores * decay * dt_row
    readout = ssd_tiles.matmul(c, h_prev_m, 1, 1)  # (q, p): C_t · h_{c-1}
    dy = dout_ref[i].astype(jnp.float32)
    if has_z:
      y = ssd_tiles.matmul(weights.astype(mm), xm, 1, 0) + w_in * readout
      if has_d:
        y += d_ref[i] * x
      zf = z_ref[i].astype(jnp.float32)
      sig = jax.nn.sigmoid(zf)
      dz_ref[i] = (dy * y * sig * (1.0 + zf * (1.0 - sig))).astype(dz_ref.dtype)
      dy = dy * zf * sig
    dym = dy.astype(mm)
    if has_d:
      dd_ref[i] += jnp.sum(dy * x, axis=0, keepdims=True)
      dx = d_ref[i] * dy
    else:
      dx = jnp.zeros_like(dy)
    # Diagonal block.
    dweights = ssd_tiles.matmul(dym, xm, 1, 1)  # (q, q): dy_t · X_s
    dx += ssd_tiles.matmul(weights.astype(mm), dym, 0, 0)  # Wᵀ dy
    g = dweights * scores * decay
    ddt_row = jnp.sum(g, axis=0, keepdims=True)
    g = g * dt_row
    dcs_row = ssd_tiles.col_to_row(jnp.sum(g, axis=1, keepdims=True)) \
        - jnp.sum(g, axis=0, keepdims=True)
    dscores_ref[...] += dweights * decay * dt_row
    # Read-out of the entering state.
    dw_in_row = ssd_tiles.col_to_row(jnp.sum(dy * readout, axis=1, keepdims=True))
    dyw = (dy * w_in).astype(mm)
    dc_ref[...] += ssd_tiles.matmul(dyw, h_prev_m, 1, 0)
    dh_prev = ssd_tiles.matmul(dyw, c, 0, 0)  # (p, n)
    # State update h_c = λ h_{c-1} + (w_out ∘ X)ᵀ B.
    dh_prev += ssd_tiles.last_entry(w_in_row) * dh
    dlam = jnp.sum(jnp.sum(dh * h_prev, axis=1, keepdims=True), axis=0, keepdims=True)
    dxw = ssd_tiles.matmul(b, dh_m, 1, 1)  # (q, p): B_s · dh
    dx += w_out * dxw
    dw_out_row = ssd_tiles.col_to_row(jnp.sum(dxw * x, axis=1, keepdims=True))
    db_ref[...] += ssd_tiles.matmul((x * w_out).astype(mm), dh_m, 1, 0)

    dx_ref[i] = dx.astype(dx_ref.dtype)
    dh_ref[i] = dh_prev
    dvec_ref[i, DCS:DCS + 1, :] = dcs_row
    dvec_ref[i, DDT:DDT + 1, :] = ddt_row
    dvec_ref[i, DW_IN:DW_IN + 1, :] = dw_in_row + jnp.where(last, dlam, 0.0)
    dvec_ref[i, DW_OUT:DW_OUT + 1, :] = dw_out_row
    return carry

  lax.fori_loop(0, heads, head, 0)
  dscores = dscores_ref[...].astype(mm)
  dc_ref[...] += ssd_tiles.matmul(dscores, b, 1, 0)
  db_ref[...] += ssd_tiles.matmul(dscores, c, 0, 0)

  if has_init:
    @pl.when(step == pl.num_programs(2) - 1)
    def _():
      dinit_ref[...] = dh_ref[...]


@functools.partial(jax.jit, static_argnames=("blocks", "has_seq", "has_init", "interpret"))
def ssd_bwd(x: jax.Array, B: jax.Array, C: jax.Array, vec: jax.Array, d: jax.Array | None,
            z: jax.Array | None, states: jax.Array, dout: jax.Array, dfinal: jax.Array, *,
            blocks: SSDTpuBlockSizes, has_seq: bool, has_init: bool, interpret=False):
  """Cotangents of ``ssd_fwd``'s inputs, by the reverse chunk loop (see the module docstring).

  Args:
    x, B, C, vec, d, z: ``ssd_fwd``'s inputs (kernel layout: x, z (b, h, l, p); B, C
      (b, g, l, n); vec (b, h, c, 5, q) float32; d (h, 1, p) float32 or None).
    states: (b, h, c, p, n) float32, the state entering every chunk (``save_states``).
    dout: (b, h, l, p) in x's dtype, cotangent of y.
    dfinal: (b, h, p, n) float32, cotangent of the final states.
    blocks: ``ssd_fwd``'s block sizes.
    has_seq: the forward masked by segment ids.
    has_init: return the initial states' cotangent.
    interpret: False, or ``pltpu.InterpretParams()``.

  Returns:
    dx (b, h, l, p) in x's dtype; dB, dC (b, g, l, n) float32; dvec (b, h, c, 4, q) float32
    (rows dcs, ddt, dw_in, dw_out); dd (h, 1, p) float32 or None; dz like z or None;
    dinit (b, h, p, n) float32 or None.
  """
  batch, heads, length, head_dim = x.shape
  groups, d_state = B.shape[1], B.shape[3]
  q, r = blocks.chunk_size, blocks.heads_per_block
  chunks = length // q
  blocks_per_group = heads // groups // r

  head_tile = lambda bi, hj, k: (bi, hj, chunks - 1 - k, 0)
  group_tile = lambda bi, hj, k: (bi, hj // blocks_per_group, chunks - 1 - k, 0)
  chunk_rows = lambda bi, hj, k: (bi, hj, chunks - 1 - k, 0, 0)
  state_tile = pl.BlockSpec((None, r, head_dim, d_state), lambda bi, hj, k: (bi, hj, 0, 0))
  qp_tile = pl.BlockSpec((None, r, q, head_dim), head_tile)
  in_specs = [qp_tile,
              pl.BlockSpec((None, None, q, d_state), group_tile),
              pl.BlockSpec((None, None, q, d_state), group_tile),
              pl.BlockSpec((None, r, None, VEC_ROWS, q), chunk_rows)]
  args = [x, B, C, vec]
  if d is not None:
    in_specs.append(pl.BlockSpec((r, 1, head_dim), lambda bi, hj, k: (hj, 0, 0)))
    args.append(d)
  if z is not None:
    in_specs.append(qp_tile)
    args.append(z)
  in_specs += [pl.BlockSpec((None, r, None, head_dim, d_state), chunk_rows), state_tile,
               qp_tile]
  args += [states, dfinal, dout]

  out_specs = [qp_tile]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if z is not None:
    out_specs.append(qp_tile)
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  # dB and dC per head block: (b, h / r, l, n), summed over a group's blocks below.
  block_qn = pl.BlockSpec((None, None, q, d_state), lambda bi, hj, k: (bi, hj, chunks - 1 - k, 0))
  out_specs += [block_qn, block_qn, pl.BlockSpec((None, r, None, DVEC_ROWS, q), chunk_rows)]
  qn_shape = jax.ShapeDtypeStruct((batch, heads // r, length, d_state), jnp.float32)
  out_shape += [qn_shape, qn_shape,
                jax.ShapeDtypeStruct((batch, heads, chunks, DVEC_ROWS, q), jnp.float32)]
  if d is not None:
    out_specs.append(pl.BlockSpec((None, r, 1, head_dim), lambda bi, hj, k: (bi, hj, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, 1, head_dim), jnp.float32))
  if has_init:
    out_specs.append(state_tile)
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), jnp.float32))

  kernel = functools.partial(_ssd_bwd_kernel, has_d=d is not None, has_z=z is not None,
                             has_init=has_init, has_seq=has_seq)
  outs = list(pl.pallas_call(
      kernel,
      grid=(batch, heads // r, chunks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((r, head_dim, d_state), jnp.float32),
                      pltpu.VMEM((q, q), jnp.float32)],
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
  )(*args))
  dx = outs.pop(0)
  dz = outs.pop(0) if z is not None else None
  db, dc, dvec = outs[:3]
  del outs[:3]
  dd = jnp.sum(outs.pop(0), axis=0) if d is not None else None
  dinit = outs.pop(0) if has_init else None
  group_sum = lambda v: v.reshape(batch, groups, blocks_per_group, length, d_state).sum(2)
  return dx, group_sum(db), group_sum(dc), dvec, dd, dz, dinit
