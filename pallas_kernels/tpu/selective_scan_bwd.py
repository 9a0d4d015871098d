"""The selective-scan (S6) backward as one fused Pallas Mosaic TPU kernel.

Forward (per channel i, state k; ā_t = keep_t exp(Δ_t A), see ``selective_scan_fwd``):
  h_t = ā_t ⊙ h_{t−1} + Δ_t u_t B_t,   y_t = C_t · h_t + D u_t,   out_t = y_t silu(z_t).

Backward, with dout_t the cotangent of out_t and g_t = ∂L/∂h_t the adjoint of the state (all
later uses of h_t: its read-out and the next step), running the recurrence in reverse:

  dy_t    = dout_t silu(z_t)                 dz_t = dout_t y_t silu'(z_t)
  g_{l−1} = dfinal + C_{l−1} dy_{l−1}
  g_{t−1} = ā_t ⊙ g_t + C_{t−1} dy_{t−1}     dinitial_state = ā_0 ⊙ g_0
  du_t    = Δ_t Σ_k g_tk B_tk + D dy_t
  dΔ_t    = Σ_k g_tk (ā_tk A_k h_{t−1,k} + B_tk u_t)
  ddelta_t = dΔ_t σ(delta_t + delta_bias)   (softplus' = σ; without softplus ddelta_t = dΔ_t)
  dA_k    = Σ_{b,t} g_tk ā_tk Δ_t h_{t−1,k}   ddelta_bias = Σ_{b,t} ddelta_t
  dD      = Σ_{b,t} dy_t u_t                  dB_tk = Σ_i g_tik Δ_ti u_ti,  dC_tk = Σ_i dy_ti h_tik
(sums over i run over the channels of B's / C's group). Where seq_idx cuts the decay, ā_t = 0,
so neither the adjoint nor dΔ, dA cross the boundary.

Grid (b, d / block_d, l / block_l) with the chunk axis last, "arbitrary" and walked in reverse
(the index maps read chunk c_last − c). The adjoint g (n, block_d) and the dA, dD, ddelta_bias
accumulators live in VMEM scratch, initialised at the first step (g = dfinal). A grid step
recomputes its chunk forward from the saved entering state, storing the block_l + 1 states in a
(block_l + 1, n, block_d) float32 VMEM scratch (4.1 MiB at block_l = 128, block_d = 512,
n = 16), then walks the chunk backwards in groups of 16 positions, gathering the rows of du,
ddelta, dz, dB and dC into (16, ·) tiles. dB and dC leave as float32 partial sums per channel
block, (b, d / block_d, l, n), summed over the blocks of a group by the caller; dA, dD and
ddelta_bias as per-batch-row partial sums.

TPU speed is unmeasured: no TPU was available. The kernel is tested in the TPU interpreter on
CPU and lowered to Mosaic (not compiled) in the tests.

Shape legend: b batch, l padded length, d padded d_inner, n d_state, g groups.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import (sigmoid, silu_and_grad, split_bwd_outputs,
                                                    split_bwd_refs)
from pallas_kernels.tpu.selective_scan_fwd import (ROWS, ScanTpuBlockSizes, col_to_row,
                                                   decay_at, load_rows, put_row, row_to_col)


def _bwd_kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_keep: bool, length: int,
                padded: bool, delta_softplus: bool):
  """One (b, channel block, reversed chunk) grid step; refs in the order built by ``scan_bwd``.

  Inputs u_ref, delta_ref, z_ref, dout_ref (block_l, bd); at_ref (n, bd); b_ref, c_ref
  (block_l, n); d_ref, bias_ref (1, bd); keep_ref (block_l, 1); states_ref, dfinal_ref (n, bd).
  Outputs du_ref, ddelta_ref, dz_ref (block_l, bd); db_ref, dc_ref (block_l, n); da_ref,
  dinit_ref (n, bd); dd_ref, dbias_ref (1, bd). Scratch g_ref, da_acc (n, bd), vec_acc (2, bd),
  hs_ref (block_l + 1, n, bd), all float32.
  """
  (u_ref, delta_ref, at_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, keep_ref, states_ref,
   dout_ref, dfinal_ref, du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
   dinit_ref), (g_ref, da_acc, vec_acc, hs_ref) = split_bwd_refs(
      refs, has_d=has_d, has_z=has_z, has_bias=has_bias, has_keep=has_keep)

  step = pl.program_id(2)
  block_l = u_ref.shape[0]
  groups_of_rows = block_l // ROWS
  pos0 = (pl.num_programs(2) - 1 - step) * block_l
  at = at_ref[...]
  bias = bias_ref[...] if has_bias else None
  d = d_ref[...] if has_d else None
  load = functools.partial(load_rows, u_ref=u_ref, delta_ref=delta_ref, b_ref=b_ref, bias=bias,
                           keep_ref=keep_ref, length=length, padded=padded,
                           delta_softplus=delta_softplus)

  @pl.when(step == 0)
  def _():
    g_ref[...] = dfinal_ref[...]
    da_acc[...] = jnp.zeros_like(da_acc)
    vec_acc[...] = jnp.zeros_like(vec_acc)

  def forward(s, h):
    r0 = pl.multiple_of(s * ROWS, ROWS)
    u, _, dt, b, keep = load(r0, pos0)
    du = dt * u
    for j in range(ROWS):
      hs_ref[r0 + j] = h
      h = decay_at(j, dt, at, keep) * h + row_to_col(b[j:j + 1, :]) * du[j:j + 1, :]
    return h

  steps = (jnp.int32(0), jnp.int32(groups_of_rows))  # int32 indices also under jax_enable_x64
  hs_ref[block_l] = lax.fori_loop(*steps, forward, states_ref[...])

  def backward(k, carry):
    g, da, dd, dbias = carry
    r0 = pl.multiple_of((groups_of_rows - 1 - k) * ROWS, ROWS)
    rows = pl.ds(r0, ROWS)
    u, x, dt, b, keep = load(r0, pos0)
    c = c_ref[rows, :].astype(jnp.float32)
    dout = dout_ref[rows, :].astype(jnp.float32)
    if has_z:
      silu, dsilu = silu_and_grad(z_ref[rows, :].astype(jnp.float32))
      dy = dout * silu
      y = d * u if has_d else jnp.zeros(u.shape, jnp.float32)
    else:
      dy = dout
    du_dt = dt * u
    ddt = jnp.zeros(u.shape, jnp.float32)
    gb_rows = jnp.zeros(u.shape, jnp.float32)
    db = jnp.zeros(c.shape, jnp.float32)
    dc = jnp.zeros(c.shape, jnp.float32)
    for j in reversed(range(ROWS)):
      h_prev, h = hs_ref[r0 + j], hs_ref[r0 + j + 1]
      c_col = row_to_col(c[j:j + 1, :])
      if has_z:
        y = put_row(y, j, y[j:j + 1, :] + jnp.sum(c_col * h, axis=0, keepdims=True))
      g = g + c_col * dy[j:j + 1, :]
      dc = put_row(dc, j, col_to_row(jnp.sum(h * dy[j:j + 1, :], axis=1, keepdims=True)))
      db = put_row(db, j, col_to_row(jnp.sum(g * du_dt[j:j + 1, :], axis=1, keepdims=True)))
      decay = decay_at(j, dt, at, keep)
      g_decay_h = g * decay * h_prev
      gb = jnp.sum(g * row_to_col(b[j:j + 1, :]), axis=0, keepdims=True)
      gb_rows = put_row(gb_rows, j, gb)
      ddt = put_row(ddt, j, jnp.sum(g_decay_h * at, axis=0, keepdims=True) + gb * u[j:j + 1, :])
      da = da + g_decay_h * dt[j:j + 1, :]
      g = g * decay
    du = dt * gb_rows
    if has_d:
      du = du + d * dy
      dd = dd + jnp.sum(dy * u, axis=0, keepdims=True)
    if has_z:
      dz_ref[rows, :] = (dout * y * dsilu).astype(dz_ref.dtype)
    if padded:
      pos = pos0 + r0 + lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0)
      ddt = jnp.where(pos < length, ddt, 0.0)
    if delta_softplus:
      ddt = ddt * sigmoid(x)
    if has_bias:
      dbias = dbias + jnp.sum(ddt, axis=0, keepdims=True)
    du_ref[rows, :] = du.astype(du_ref.dtype)
    ddelta_ref[rows, :] = ddt.astype(ddelta_ref.dtype)
    db_ref[rows, :] = db
    dc_ref[rows, :] = dc
    return g, da, dd, dbias

  vec = vec_acc[...]
  g, da, dd, dbias = lax.fori_loop(*steps, backward,
                                   (g_ref[...], da_acc[...], vec[0:1, :], vec[1:2, :]))
  g_ref[...] = g
  da_acc[...] = da
  vec_acc[0:1, :] = dd
  vec_acc[1:2, :] = dbias

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dinit_ref[...] = g
    da_ref[...] = da
    if has_d:
      dd_ref[...] = dd
    if has_bias:
      dbias_ref[...] = dbias


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "blocks",
                                             "interpret"))
def scan_bwd(u: jax.Array, delta: jax.Array, at: jax.Array, B: jax.Array, C: jax.Array,
             d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
             keep: jax.Array | None, states: jax.Array, dout: jax.Array, dfinal: jax.Array, *,
             length: int, delta_softplus: bool, blocks: ScanTpuBlockSizes, interpret=False):
  """The fused backward in the kernel layout (equations in the module docstring).

  Args:
    u, delta, at, B, C, d, z, bias, keep: as for ``scan_fwd``.
    states: (b, l / block_l, n, d) float32, the chunk-entering states ``scan_fwd`` saved.
    dout: (b, l, d) cotangent of the output, zero in the padding.
    dfinal: (b, n, d) float32 cotangent of the final state (transposed).
    length, delta_softplus, blocks, interpret: as for ``scan_fwd``.

  Returns:
    du (b, l, d) in u's dtype, ddelta (b, l, d) in delta's dtype, dz (b, l, d) in z's dtype or
    None, dB and dC partials (b, d / block_d, l, n) float32, dA partials (b, n, d) float32,
    dD and ddelta_bias partials (b, 1, d) float32 or None, dinitial_state (b, n, d) float32.
  """
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[1], B.shape[3]
  bl, bd = blocks.block_l, blocks.block_d
  nblk = d_inner // bd
  per_group_blocks = nblk // groups
  chunks = padded_length // bl
  rev = lambda c: chunks - 1 - c

  seq_spec = pl.BlockSpec((None, bl, bd), lambda bi, j, c: (bi, rev(c), j))
  group_spec = pl.BlockSpec((None, None, bl, d_state),
                            lambda bi, j, c: (bi, j // per_group_blocks, rev(c), 0))
  state_spec = pl.BlockSpec((None, d_state, bd), lambda bi, j, c: (bi, 0, j))
  vec_spec = pl.BlockSpec((1, bd), lambda bi, j, c: (0, j))
  row_spec = pl.BlockSpec((None, 1, bd), lambda bi, j, c: (bi, 0, j))
  part_spec = pl.BlockSpec((None, None, bl, d_state), lambda bi, j, c: (bi, j, rev(c), 0))
  in_specs = [seq_spec, seq_spec, pl.BlockSpec((d_state, bd), lambda bi, j, c: (0, j)),
              group_spec, group_spec]
  args = [u, delta, at, B, C]
  for x, spec in ((d, vec_spec), (z, seq_spec), (bias, vec_spec),
                  (keep, pl.BlockSpec((None, bl, 1), lambda bi, j, c: (bi, rev(c), 0)))):
    if x is not None:
      in_specs.append(spec)
      args.append(x)
  in_specs += [pl.BlockSpec((None, None, d_state, bd), lambda bi, j, c: (bi, rev(c), 0, j)),
               seq_spec, state_spec]
  args += [states, dout, dfinal]

  f32 = jnp.float32
  out_specs = [seq_spec, seq_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if z is not None:
    out_specs.append(seq_spec)
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_specs += [part_spec, part_spec, state_spec]
  out_shape += [jax.ShapeDtypeStruct((batch, nblk, padded_length, d_state), f32)] * 2
  out_shape.append(jax.ShapeDtypeStruct((batch, d_state, d_inner), f32))
  for x in (d, bias):
    if x is not None:
      out_specs.append(row_spec)
      out_shape.append(jax.ShapeDtypeStruct((batch, 1, d_inner), f32))
  out_specs.append(state_spec)
  out_shape.append(jax.ShapeDtypeStruct((batch, d_state, d_inner), f32))

  kernel = functools.partial(
      _bwd_kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_keep=keep is not None, length=length, padded=length != padded_length,
      delta_softplus=delta_softplus)
  outs = list(pl.pallas_call(
      kernel,
      grid=(batch, nblk, chunks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((d_state, bd), f32), pltpu.VMEM((d_state, bd), f32),
                      pltpu.VMEM((2, bd), f32), pltpu.VMEM((bl + 1, d_state, bd), f32)],
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
      name="selective_scan_bwd",
  )(*args))
  return split_bwd_outputs(outs, has_d=d is not None, has_z=z is not None,
                           has_bias=bias is not None)
