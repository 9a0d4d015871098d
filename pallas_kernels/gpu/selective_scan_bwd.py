"""The selective-scan (S6) backward as one fused Pallas GPU kernel (Triton lowering).

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
(the sums over i run over the channels of B's / C's group). Where seq_idx cuts the decay,
ā_t = 0, so neither the adjoint nor dΔ, dA cross the boundary.

One program per (batch row, block of channels), walking the chunks of ``block_l`` positions in
reverse and carrying g (block_d, n) in registers. A chunk is recomputed from its saved entering
state in two levels, so that no state is ever stored to memory: (1) a forward pass over the
chunk keeps the states entering each sub-chunk of ``sub_l`` positions ((block_l / sub_l,
block_d, n) in registers), then (2) for each sub-chunk in reverse, an unrolled forward keeps its
sub_l + 1 states and an unrolled reverse pass applies the equations above. That costs two extra
forward evaluations of exp(ΔA) and the update (three exps per element in the backward; mamba_ssm's
CUDA backward recomputes the forward once, with the whole chunk in registers of a thread block).

dB, dC are written as float32 partial sums per channel block, (b, l, d / block_d, n), and reduced
over the blocks of a group by the caller; dA, dD, ddelta_bias as per-batch-row partial sums.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. See
``selective_scan_fwd`` for the Mosaic GPU port that comes next.

Shape legend: b batch, l padded length, d d_inner, n d_state, g groups.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import (sigmoid, silu_and_grad, split_bwd_outputs,
                                                    split_bwd_refs)
from pallas_kernels.gpu.selective_scan_fwd import ScanGpuBlockSizes, step_inputs


def _bwd_kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_keep: bool, length: int,
                padded: bool, delta_softplus: bool, block_l: int, sub_l: int):
  """One (batch row, channel block) program; refs in the order built by ``scan_bwd``.

  Inputs u_ref, delta_ref, z_ref, dout_ref (l, bd); a_ref (bd, n); b_ref, c_ref (l, n);
  d_ref, bias_ref (bd,); keep_ref (l,); states_ref (c, bd, n); dfinal_ref (bd, n).
  Outputs du_ref, ddelta_ref, dz_ref (l, bd); db_ref, dc_ref (l, n) partial sums;
  da_ref, dinit_ref (bd, n); dd_ref, dbias_ref (bd,) partial sums.
  """
  (u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, keep_ref, states_ref,
   dout_ref, dfinal_ref, du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
   dinit_ref), _ = split_bwd_refs(
      refs, has_d=has_d, has_z=has_z, has_bias=has_bias, has_keep=has_keep)

  a = a_ref[...]
  d = d_ref[...] if has_d else None
  bias = bias_ref[...] if has_bias else None
  chunks = u_ref.shape[0] // block_l
  subs = block_l // sub_l
  bd, n = a.shape
  inputs = functools.partial(step_inputs, u_ref=u_ref, delta_ref=delta_ref, b_ref=b_ref,
                             bias=bias, keep_ref=keep_ref, a=a, length=length, padded=padded,
                             delta_softplus=delta_softplus)

  def advance(t, h):
    u, _, dt, b, decay = inputs(t)
    return decay * h + (dt * u)[:, None] * b[None, :]

  def reverse_step(t, h_prev, h, carry):
    g, da, dd, dbias = carry
    u, x, dt, b, decay = inputs(t)
    c = c_ref[t, :].astype(jnp.float32)
    dout = dout_ref[t, :].astype(jnp.float32)
    if has_z:
      y = jnp.sum(h * c[None, :], axis=1)
      if has_d:
        y = y + d * u
      silu, dsilu = silu_and_grad(z_ref[t, :].astype(jnp.float32))
      dz_ref[t, :] = (dout * y * dsilu).astype(dz_ref.dtype)
      dy = dout * silu
    else:
      dy = dout
    g = g + dy[:, None] * c[None, :]
    dc_ref[t, :] = jnp.sum(dy[:, None] * h, axis=0)
    db_ref[t, :] = jnp.sum(g * (dt * u)[:, None], axis=0)
    g_decay_h = g * decay * h_prev
    gb = jnp.sum(g * b[None, :], axis=1)
    ddt = jnp.sum(g_decay_h * a, axis=1) + gb * u
    da = da + g_decay_h * dt[:, None]
    du = dt * gb
    if has_d:
      du = du + d * dy
      dd = dd + dy * u
    if padded:
      ddt = jnp.where(t < length, ddt, 0.0)
    if delta_softplus:
      ddt = ddt * sigmoid(x)
    if has_bias:
      dbias = dbias + ddt
    du_ref[t, :] = du.astype(du_ref.dtype)
    ddelta_ref[t, :] = ddt.astype(ddelta_ref.dtype)
    return g * decay, da, dd, dbias

  def chunk(i, carry):
    c = chunks - 1 - i
    base = c * block_l
    h = states_ref[c]
    sub_index = lax.broadcasted_iota(jnp.int32, (subs, bd, n), 0)
    if subs > 1:
      def sub_forward(m, loop):
        h, starts = loop
        starts = jnp.where(sub_index == m, h[None], starts)
        h = lax.fori_loop(0, sub_l, lambda j, h: advance(base + m * sub_l + j, h), h)
        return h, starts
      h, starts = lax.fori_loop(0, subs - 1, sub_forward,
                                (h, jnp.zeros((subs, bd, n), jnp.float32)))
      starts = jnp.where(sub_index == subs - 1, h[None], starts)

    def sub_backward(k, carry):
      m = subs - 1 - k
      sub_base = base + m * sub_l
      if subs > 1:
        h_start = jnp.sum(jnp.where(sub_index == m, starts, 0.0), axis=0)
      else:
        h_start = h
      hs = [h_start]
      for j in range(sub_l):
        hs.append(advance(sub_base + j, hs[-1]))
      for j in reversed(range(sub_l)):
        carry = reverse_step(sub_base + j, hs[j], hs[j + 1], carry)
      return carry

    return lax.fori_loop(0, subs, sub_backward, carry)

  zeros_d = jnp.zeros((bd,), jnp.float32)
  g, da, dd, dbias = lax.fori_loop(
      0, chunks, chunk, (dfinal_ref[...], jnp.zeros((bd, n), jnp.float32), zeros_d, zeros_d))
  da_ref[...] = da
  dinit_ref[...] = g
  if has_d:
    dd_ref[...] = dd
  if has_bias:
    dbias_ref[...] = dbias


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "blocks",
                                             "interpret"))
def scan_bwd(u: jax.Array, delta: jax.Array, a: jax.Array, B: jax.Array, C: jax.Array,
             d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
             keep: jax.Array | None, states: jax.Array, dout: jax.Array, dfinal: jax.Array, *,
             length: int, delta_softplus: bool, blocks: ScanGpuBlockSizes,
             interpret: bool = False):
  """The fused backward over the padded length (equations in the module docstring).

  Args:
    u, delta, a, B, C, d, z, bias, keep: as for ``scan_fwd``.
    states: (b, l / block_l, d, n) float32, the chunk-entering states ``scan_fwd`` saved.
    dout: (b, l, d) cotangent of the output, zero in the padding.
    dfinal: (b, d, n) float32 cotangent of the final state.
    length, delta_softplus, blocks, interpret: as for ``scan_fwd``.

  Returns:
    du (b, l, d) in u's dtype, ddelta (b, l, d) in delta's dtype, dz (b, l, d) in z's dtype or
    None, dB and dC partials (b, l, d / block_d, n) float32, dA partials (b, d, n) float32,
    dD and ddelta_bias partials (b, d) float32 or None, dinitial_state (b, d, n) float32.
  """
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[2], B.shape[3]
  bd = blocks.block_d
  nblk = d_inner // bd
  per_group_blocks = nblk // groups
  chunks = padded_length // blocks.block_l

  seq_spec = pl.BlockSpec((None, padded_length, bd), lambda j, bi: (bi, 0, j))
  group_spec = pl.BlockSpec((None, padded_length, None, d_state),
                            lambda j, bi: (bi, 0, j // per_group_blocks, 0))
  state_spec = pl.BlockSpec((None, bd, d_state), lambda j, bi: (bi, j, 0))
  vec_spec = pl.BlockSpec((bd,), lambda j, bi: (j,))
  row_spec = pl.BlockSpec((None, bd), lambda j, bi: (bi, j))
  part_spec = pl.BlockSpec((None, padded_length, None, d_state), lambda j, bi: (bi, 0, j, 0))
  in_specs = [seq_spec, seq_spec, pl.BlockSpec((bd, d_state), lambda j, bi: (j, 0)),
              group_spec, group_spec]
  args = [u, delta, a, B, C]
  for x, spec in ((d, vec_spec), (z, seq_spec), (bias, vec_spec),
                  (keep, pl.BlockSpec((None, padded_length), lambda j, bi: (bi, 0)))):
    if x is not None:
      in_specs.append(spec)
      args.append(x)
  in_specs += [pl.BlockSpec((None, chunks, bd, d_state), lambda j, bi: (bi, 0, j, 0)),
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
  out_shape += [jax.ShapeDtypeStruct((batch, padded_length, nblk, d_state), f32)] * 2
  out_shape.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))
  for x in (d, bias):
    if x is not None:
      out_specs.append(row_spec)
      out_shape.append(jax.ShapeDtypeStruct((batch, d_inner), f32))
  out_specs.append(state_spec)
  out_shape.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))

  kernel = functools.partial(
      _bwd_kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_keep=keep is not None, length=length, padded=length != padded_length,
      delta_softplus=delta_softplus, block_l=blocks.block_l, sub_l=blocks.sub_l)
  outs = list(pl.pallas_call(
      kernel,
      grid=(nblk, batch),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
      name="selective_scan_bwd",
  )(*args))
  return split_bwd_outputs(outs, has_d=d is not None, has_z=z is not None,
                           has_bias=bias is not None)
