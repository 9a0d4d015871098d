"""The selective-scan (S6) backward on Hopper as one Mosaic GPU Pallas kernel (``plgpu.kernel``).

Forward (per channel i, state k; ā_t = keep_t exp(Δ_t A), see ``selective_scan_mgpu``):

  Δ_t = softplus(delta_t + delta_bias),  h_t = ā_t ⊙ h_{t−1} + Δ_t u_t B_t,
  y_t = C_t · h_t + D u_t,  out_t = y_t silu(z_t).

Backward, with dout_t the cotangent of out_t and g_t = ∂L/∂h_t the adjoint of the state (its
read-out at t and the step t → t+1), the recurrence run in reverse from the cotangent dfinal of
the final state:

  dy_t    = dout_t silu(z_t)                   dz_t = dout_t y_t silu'(z_t)
  g_{l−1} = dfinal + C_{l−1} dy_{l−1},         g_{t−1} = ā_t ⊙ g_t + C_{t−1} dy_{t−1}
  dinitial_state = ā_0 ⊙ g_0
  du_t    = Δ_t Σ_k g_tk B_tk + D dy_t
  dΔ_t    = Σ_k g_tk (ā_tk A_k h_{t−1,k} + B_tk u_t),  ddelta_t = dΔ_t σ(delta_t + delta_bias)
            (softplus' = σ; without the softplus ddelta_t = dΔ_t; 0 on padding)
  dA_k    = Σ_{b,t} g_tk ā_tk Δ_t h_{t−1,k}     ddelta_bias = Σ_{b,t} ddelta_t
  dD      = Σ_{b,t} dy_t u_t
  dB_tk   = Σ_i g_tik Δ_ti u_ti                 dC_tk = Σ_i dy_ti h_tik

(the sums over i run over the channels of B's / C's group). Where seq_idx cuts the decay
(keep_t = 0), ā_t = 0: neither the adjoint nor dΔ, dA cross the boundary.

``scan_bwd_mgpu`` has exactly the arguments and results of the Triton-lowered
``selective_scan_bwd.scan_bwd`` and reads the residuals of either forward (the inputs and the
float32 state entering every chunk of ``blocks.block_l`` positions). Its dB, dC partial sums
are per block of ``BLOCK_D`` = 64 channels, (b, l, d / 64, n), which the wrapper reduces over
the blocks of a group exactly as it reduces the Triton kernel's (b, l, d / block_d, n).

Design. One CTA = one warpgroup (128 threads) per (block of 64 channels of one group, batch
row), with the forward's register layouts (``selective_scan_mgpu``: the (64, n) float32 state
and adjoint in the wgmma accumulator layout, per-channel vectors in its ``.reduce(1)`` layout,
per-state vectors B_t, C_t, dB_t, dC_t in its ``.reduce(0)`` layout). The CTA walks the
block_l chunks from the last to the first, carrying g (64, n) and the dA (64, n), dD, dbias (64,)
accumulators in registers, all float32. A chunk's rows of u, delta, z, dout (block_l × 64), B, C
(block_l × n of the block's group), keep (block_l,) and its saved entering state (64 × n
float32) are TMA-copied into a ring of ``in_depth`` shared-memory slots, issued ``in_depth``
chunks ahead (the ring runs backwards along the sequence). Per chunk, with ``sub`` =
``sub_rows(block_l, n, blocks.sub_l)`` positions per sub-chunk (8 for n = 16 and the default
blocks):

  1. a forward pass over the chunk from its saved state writes the state entering each
     sub-chunk into shared memory ((block_l / sub, 64, n) float32; each thread writes and
     later reads only its own fragment, so no barrier is needed);
  2. for each sub-chunk from the last: an unrolled forward pass from its entering state keeps
     its sub + 1 states in registers, then an unrolled reverse pass applies the equations above
     position by position. Reductions over the states (y_t, Σ_k g B, Σ_k g ā A h) are shuffles
     inside a quad of lanes; the reductions over the 64 channels (dB_t, dC_t) cross the four
     warps (Mosaic GPU's reduction through ``reduction_scratch_bytes`` of shared memory).

The per-position rows du, ddelta, dz (block_l × 64) and the dB, dC partials (block_l × n
float32) are written into ``out_depth`` shared-memory tiles and TMA-stored once per chunk;
dA, dD, dbias, dinitial_state once per CTA at the end. Like the Triton kernel, this costs three
evaluations of exp(Δ A) per (position, channel, state); the expanded state (b, l, d, n) never
reaches memory.

Small batches of long sequences give too few CTAs (b · d / 64: 32 at b = 1, d = 2048), and each
walks its whole sequence serially. As the forward does (with the same ``segment_count``),
``scan_bwd_mgpu`` then splits every sequence into segments of whole block_l chunks
(``scan_bwd_mgpu_segments``): the adjoint recurrence is linear, so a cheap launch computes each
segment's adjoint entering it from a zero cotangent at its end (no states, no outputs but that),
an XLA recurrence over the segment decays gives the cotangent of the state leaving every
segment, and the full launch runs the segments in parallel from those.

Compiled, the kernel runs without Pallas' automatic barriers (``unsafe_no_auto_barriers``), as
the forward: no thread reads a buffer that another thread writes except through TMA, and every
hand-over (input slots, output tiles) goes through ``barrier_wait`` / ``commit_smem`` /
``wait_smem_to_gmem``.

Status: its GPU tests pass on an H100 (tests/kernels/test_selective_scan_mgpu.py: the vjp of
every input against the float64 oracle, and result by result against the Triton-lowered
backward, one launch and segments); in Mosaic GPU's CPU interpreter every gradient matches the
float64 oracle's to float32 rounding (norm-relative errors 1e-7 to 3e-7 in float32; 1e-3 to
2e-3 in bf16, from rounding the per-position gradients to bf16) and the race detector finds no
race. Shared memory sets the speed: at block_l 64 (sub-chunks of 8) one CTA needs about 196 KiB
in bf16, one CTA per SM, and forward+backward took 15.9 / 17.0 / 20.3 ms at L = 1K / 4K / 16K
(H100, d 2048, N 16, 65,536 tokens); at block_l 32 (about 111 KiB, two CTAs per SM) 10.6 /
11.1 / 14.3 ms, against mamba_ssm CUDA's 11.4 / 11.8 / 12.4 (docs/results/s6_blocks_h100.json).
The wrapper's Mosaic default is block_l 32 (``selective_scan.MOSAIC_BLOCK_L``). With the
hardware's approximate special functions (``selective_scan_mgpu.APPROX_MATH``, as mamba_ssm's
--use_fast_math) and the forward's chunk-wide stages, forward+backward takes 7.78 / 7.90 /
9.83 ms against CUDA's 11.32 / 11.77 / 12.37 (docs/results/s6_mosaic_h100.json); about 6.7 ms
of that is this backward at 1K. Every position does two cross-warp reductions (dB_t, dC_t),
each with two warpgroup barriers: the next thing to take out of the serial loop.

Limits (each raises ValueError naming the ``backend="triton"`` fallback): the forward's
(``selective_scan_mgpu.check_supported``: d_inner / groups a multiple of 64, d_state a multiple
of 8; block_l a multiple of 8), block_l at most 256 (one TMA box per chunk), and one CTA's
buffers must fit Hopper's shared memory (for d_state 16, block_l 64 does in every dtype; larger
d_state needs a smaller block_l: the sub-chunk states grow as block_l · n²).

Shape legend: b batch, l padded length, d d_inner, n d_state, g groups.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import (sigmoid, silu_and_grad, split_bwd_outputs,
                                                    split_bwd_refs)
from pallas_kernels.gpu.selective_scan_fwd import ScanGpuBlockSizes
from pallas_kernels.gpu.selective_scan_mgpu import (APPROX_MATH, BLOCK_D, CHANNEL, LOG2_E,
                                                    MIN_BLOCK_L, SMEM_BYTES, STATE, STATE_COL,
                                                    _softplus, check_supported, keep_slot,
                                                    load_constants, segment_count,
                                                    segment_decays)

MAX_BLOCK_L = 256           # one TMA box per chunk: box dimensions are at most 256
SUB_REGISTERS = 64          # float32 registers per thread for a sub-chunk's states


def sub_rows(block_l: int, d_state: int, sub_l: int) -> int:
  """Positions per sub-chunk: the largest power of two dividing block_l that is at most
  ``sub_l`` (``blocks.sub_l``, as in the Triton kernel) and at most what keeps the sub-chunk's
  states of (64, n) float32 (n / 2 registers per thread each) in about ``SUB_REGISTERS``
  registers per thread (8 for n = 16, 4 for n = 32)."""
  cap = max(1, min(sub_l, SUB_REGISTERS // max(1, d_state // 2)))
  return math.gcd(block_l, 1 << (cap.bit_length() - 1))


def _smem_bytes(in_depth: int, out_depth: int, block_l: int, sub: int, n: int, itemsize: int,
                *, has_z: bool, has_keep: bool) -> int:
  """Shared memory of one CTA: the input ring, the output tiles, the sub-chunk states, A,
  dfinal, the dA / dinit / dD / dbias results, D, bias and the cross-warp reduction scratch."""
  per_in = (block_l * ((3 + has_z) * BLOCK_D + 2 * n) * itemsize + BLOCK_D * n * 4
            + 4 * keep_slot(block_l) * has_keep)
  per_out = block_l * ((2 + has_z) * BLOCK_D * itemsize + 2 * n * 4)
  states = block_l // sub * BLOCK_D * n * 4
  fixed = 4 * BLOCK_D * n * 4 + 4 * BLOCK_D * 4 + _reduction_scratch(n)
  return in_depth * per_in + out_depth * per_out + states + fixed


def _reduction_scratch(n: int) -> int:
  """Bytes for one cross-warp reduction of a (64, n) float32 array over its 64 rows in a single
  round: 4 warps × 32 lanes × 2 values × 4 bytes per 8 columns (at least the default 2 KiB)."""
  return max(2048, 128 * n)


def buffer_depths(block_l: int, sub: int, n: int, itemsize: int, *, has_z: bool,
                  has_keep: bool) -> tuple[int, int]:
  """(input chunks in flight, output tiles): (2, 2), else (2, 1), (1, 2), (1, 1), the first
  whose buffers fit one CTA's shared memory."""
  size = functools.partial(_smem_bytes, block_l=block_l, sub=sub, n=n, itemsize=itemsize,
                           has_z=has_z, has_keep=has_keep)
  for depths in ((2, 2), (2, 1), (1, 2), (1, 1)):
    if size(*depths) <= SMEM_BYTES:
      return depths
  need = size(1, 1)
  raise ValueError(f"block_l={block_l} with d_state n={n} needs {need} bytes of shared memory "
                   f"per CTA > {SMEM_BYTES} in the Mosaic GPU selective-scan backward; pass "
                   "blocks with a smaller block_l or use backend=\"triton\"")


def check_supported_bwd(d_inner: int, groups: int, d_state: int, dtype, block_l: int) -> None:
  """Raises ValueError (naming ``backend="triton"``) unless the backward takes these sizes: the
  forward's limits, block_l a multiple of 8 and at most ``MAX_BLOCK_L``. (Whether one CTA's
  buffers fit shared memory is ``buffer_depths``' check, at launch.)"""
  check_supported(d_inner, groups, d_state, dtype)
  if block_l % MIN_BLOCK_L or block_l > MAX_BLOCK_L:
    raise ValueError(f"block_l={block_l} must be a multiple of {MIN_BLOCK_L} and at most "
                     f"{MAX_BLOCK_L} for the Mosaic GPU selective-scan backward; use "
                     "backend=\"triton\"")


def _bwd_kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_keep: bool, length: int,
                padded: bool, segments: int, delta_softplus: bool, block_l: int, sub: int,
                chunks: int, in_depth: int, out_depth: int, per_group: int):
  """One (channel block, row) CTA; refs in the order built by ``_launch``. A row is one of the
  ``segments`` consecutive pieces of a batch row's length (row bi = batch · segments + s), so
  its position t is the padded sequence's s · l_row + t (only for the padding mask).

  GMEM: u_ref, delta_ref, z_ref, dout_ref, du_ref, ddelta_ref, dz_ref (b, l, d); a_ref (d, n)
  float32; b_ref, c_ref (b, l, g, n); d_ref, bias_ref (d,) float32; keep_ref (b, l) float32;
  states_ref (b, l / block_l, d, n) float32; dfinal_ref, da_ref, dinit_ref (b, d, n) float32;
  db_ref, dc_ref (b, l, d / 64, n) float32; dd_ref, dbias_ref (b, d) float32.
  SMEM: ring slots u_s, dl_s, z_s, do_s (in_depth, block_l, 64), b_s, c_s (in_depth, block_l,
  n), keep_s (in_depth, block_l rounded up to 32), st_s (in_depth, 64, n); output tiles du_o,
  ddl_o, dz_o (out_depth, block_l, 64), db_o, dc_o (out_depth, block_l, n) float32; hsub_s
  (block_l / sub, 64, n) float32; a_s, dfin_s, da_s, dinit_s (64, n); d_s, bias_s, dd_s,
  dbias_s (64,).
  """
  (u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, keep_ref, states_ref,
   dout_ref, dfinal_ref, du_ref, ddelta_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref,
   dinit_ref), refs = split_bwd_refs(
      refs, has_d=has_d, has_z=has_z, has_bias=has_bias, has_keep=has_keep)
  (u_s, dl_s, z_s, do_s, b_s, c_s, keep_s, st_s, du_o, ddl_o, dz_o, db_o, dc_o, hsub_s, a_s,
   dfin_s, da_s, dinit_s, d_s, bias_s, dd_s, dbias_s, ring_bar, const_bar) = refs

  j = lax.axis_index("d")
  bi = lax.axis_index("b")
  c0 = j * BLOCK_D
  chans = pl.ds(c0, BLOCK_D)
  g = lax.div(c0, jnp.int32(per_group))
  n = a_s.shape[1]
  subs = block_l // sub

  streams = [(u_ref, u_s), (delta_ref, dl_s), (dout_ref, do_s)]
  if has_z:
    streams.append((z_ref, z_s))

  def issue(c, slot):
    """Start the TMA loads of chunk c into ring slot ``slot`` (one barrier per stream)."""
    pos = pl.ds(c * block_l, block_l)
    copies = [(src.at[bi, pos, chans], dst.at[slot]) for src, dst in streams]
    copies += [(b_ref.at[bi, pos, g], b_s.at[slot]), (c_ref.at[bi, pos, g], c_s.at[slot]),
               (states_ref.at[bi, c, chans], st_s.at[slot])]
    if has_keep:
      copies.append((keep_ref.at[bi, pos], keep_s.at[slot, pl.ds(0, block_l)]))
    for k, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, ring_bar.at[k, slot])

  num_streams = len(streams) + 3 + has_keep
  for i in range(min(in_depth, chunks)):
    issue(jnp.int32(chunks - 1 - i), i)
  consts = [(a_ref.at[chans], a_s), (dfinal_ref.at[bi, chans], dfin_s)]
  if has_d:
    consts.append((d_ref.at[chans], d_s))
  if has_bias:
    consts.append((bias_ref.at[chans], bias_s))
  load_constants(consts, const_bar)

  a = plgpu.load(a_s, layout=STATE)
  a2 = a * LOG2_E                      # exp(Δ A) = 2^(Δ A log2 e)
  row_start = lax.rem(bi, jnp.int32(segments)) * (chunks * block_l)   # position of t = 0
  d_skip = plgpu.load(d_s, layout=CHANNEL) if has_d else None
  bias = plgpu.load(bias_s, layout=CHANNEL) if has_bias else None
  by_channel = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [0])
  by_state = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [1])

  def inputs(slot, c, row):
    """u, the pre-softplus x, Δ (64,), B_t (n,) and ā_t (64, n) at row ``row`` of chunk c."""
    u = plgpu.load(u_s.at[slot, row], layout=CHANNEL).astype(jnp.float32)
    x = plgpu.load(dl_s.at[slot, row], layout=CHANNEL).astype(jnp.float32)
    if has_bias:
      x = x + bias
    dt = _softplus(x) if delta_softplus else x
    if padded:
      dt = dt * (row_start + c * block_l + row < length).astype(jnp.float32)  # padding
    decay = jnp.exp2(by_channel(dt) * a2)
    if has_keep:
      decay = decay * keep_s[slot, row]
    b_t = plgpu.load(b_s.at[slot, row], layout=STATE_COL).astype(jnp.float32)
    return u, x, dt, b_t, decay

  def advance(slot, c, row, h):
    u, _, dt, b_t, decay = inputs(slot, c, row)
    return decay * h + by_channel(dt * u) * by_state(b_t)

  def reverse_step(slot, out, c, row, h_prev, h, carry):
    """Position c · block_l + row: its rows of du, ddelta, dz, dB, dC; the carried adjoint
    (ā_{t+1} ⊙ g_{t+1} on entry, ā_t ⊙ g_t on exit) and the dA, dD, dbias sums."""
    gs, da, dd, dbias = carry
    u, x, dt, b_t, decay = inputs(slot, c, row)
    c_t = plgpu.load(c_s.at[slot, row], layout=STATE_COL).astype(jnp.float32)
    dout = plgpu.load(do_s.at[slot, row], layout=CHANNEL).astype(jnp.float32)
    if has_z:
      y = jnp.sum(h * by_state(c_t), axis=1)
      if has_d:
        y = y + d_skip * u
      silu, dsilu = silu_and_grad(plgpu.load(z_s.at[slot, row],
                                             layout=CHANNEL).astype(jnp.float32))
      dz_o.at[out, row][...] = (dout * y * dsilu).astype(dz_o.dtype)
      dy = dout * silu
    else:
      dy = dout
    gs = gs + by_channel(dy) * by_state(c_t)
    dc_o.at[out, row][...] = jnp.sum(by_channel(dy) * h, axis=0)
    db_o.at[out, row][...] = jnp.sum(gs * by_channel(dt * u), axis=0)
    g_decay_h = gs * decay * h_prev
    gb = jnp.sum(gs * by_state(b_t), axis=1)
    ddt = jnp.sum(g_decay_h * a, axis=1) + gb * u
    da = da + g_decay_h * by_channel(dt)
    du = dt * gb
    if has_d:
      du = du + d_skip * dy
      dd = dd + dy * u
    if padded:
      ddt = ddt * (row_start + c * block_l + row < length).astype(jnp.float32)
    if delta_softplus:
      ddt = ddt * sigmoid(x)
    if has_bias:
      dbias = dbias + ddt
    du_o.at[out, row][...] = du.astype(du_o.dtype)
    ddl_o.at[out, row][...] = ddt.astype(ddl_o.dtype)
    return gs * decay, da, dd, dbias

  def chunk(i, carry):
    c = chunks - 1 - i
    slot = lax.rem(i, jnp.int32(in_depth))
    out = lax.rem(i, jnp.int32(out_depth))
    for k in range(num_streams):
      plgpu.barrier_wait(ring_bar.at[k, slot])
    # The stores issued out_depth chunks ago have read the output tile ``out``.
    plgpu.wait_smem_to_gmem(out_depth - 1, wait_read_only=True)
    h = plgpu.load(st_s.at[slot], layout=STATE)
    if subs > 1:
      def sub_forward(m, h):
        hsub_s.at[m][...] = h
        return lax.fori_loop(0, sub, lambda r, h: advance(slot, c, m * sub + r, h), h)
      h = lax.fori_loop(0, subs - 1, sub_forward, h)
      hsub_s.at[subs - 1][...] = h

    def sub_backward(k, carry):
      m = subs - 1 - k
      hs = [plgpu.load(hsub_s.at[m], layout=STATE) if subs > 1 else h]
      for r in range(sub):
        hs.append(advance(slot, c, m * sub + r, hs[-1]))
      for r in reversed(range(sub)):
        carry = reverse_step(slot, out, c, m * sub + r, hs[r], hs[r + 1], carry)
      return carry

    carry = lax.fori_loop(0, subs, sub_backward, carry)
    plgpu.commit_smem()   # output rows visible to TMA; every thread has read the ring slot

    @pl.when(c - in_depth >= 0)
    def _():
      issue(c - in_depth, slot)

    pos = pl.ds(c * block_l, block_l)
    tiles = [(du_o, du_ref), (ddl_o, ddelta_ref)] + ([(dz_o, dz_ref)] if has_z else [])
    for src, dst in tiles:
      plgpu.copy_smem_to_gmem(src.at[out], dst.at[bi, pos, chans], commit_group=False)
    for src, dst in ((db_o, db_ref), (dc_o, dc_ref)):
      plgpu.copy_smem_to_gmem(src.at[out], dst.at[bi, pos, j], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    return carry

  zeros_d = plgpu.layout_cast(jnp.zeros((BLOCK_D,), jnp.float32), CHANNEL)
  carry = (plgpu.load(dfin_s, layout=STATE),
           plgpu.layout_cast(jnp.zeros((BLOCK_D, n), jnp.float32), STATE), zeros_d, zeros_d)
  gs, da, dd, dbias = lax.fori_loop(jnp.int32(0), jnp.int32(chunks), chunk, carry)
  da_s[...] = da
  dinit_s[...] = gs
  if has_d:
    dd_s[...] = dd
  if has_bias:
    dbias_s[...] = dbias
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(da_s, da_ref.at[bi, chans], commit_group=False)
  plgpu.copy_smem_to_gmem(dinit_s, dinit_ref.at[bi, chans], commit_group=False)
  if has_d:
    plgpu.copy_smem_to_gmem(dd_s, dd_ref.at[bi, chans], commit_group=False)
  if has_bias:
    plgpu.copy_smem_to_gmem(dbias_s, dbias_ref.at[bi, chans], commit_group=False)
  plgpu.commit_smem_to_gmem_group()
  plgpu.wait_smem_to_gmem(0)


def _options(interpret, d_state: int) -> dict:
  """``plgpu.kernel``'s interpreter or compiler options."""
  if interpret:
    params = interpret if isinstance(interpret, plgpu.InterpretGPUParams) else (
        plgpu.InterpretGPUParams())
    return dict(interpret=params)
  return dict(compiler_params=plgpu.CompilerParams(
      unsafe_no_auto_barriers=True, reduction_scratch_bytes=_reduction_scratch(d_state),
      approx_math=APPROX_MATH))


def _launch(u, delta, a, B, C, d, z, bias, keep, states, dout, dfinal, *, length: int,
            segments: int, delta_softplus: bool, block_l: int, sub: int, interpret):
  """One launch of ``_bwd_kernel`` over rows (b', l', d) that are ``segments`` consecutive
  pieces of each padded sequence (b' = b · segments; 1: whole sequences), each with its own
  dfinal (b', d, n) and states (b', l' / block_l, d, n). Returns scan_bwd's results per row."""
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[2], B.shape[3]
  chunks = padded_length // block_l
  itemsize = max(x.dtype.itemsize for x in (u, delta, B, C, z, dout) if x is not None)
  in_depth, out_depth = buffer_depths(block_l, sub, d_state, itemsize, has_z=z is not None,
                                      has_keep=keep is not None)
  nblk = d_inner // BLOCK_D

  args = [u, delta, a, B, C]
  for x in (d, z, bias, keep):
    if x is not None:
      args.append(x)
  args += [states, dout, dfinal]
  f32 = jnp.float32
  out_type = [jax.ShapeDtypeStruct(u.shape, u.dtype),
              jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if z is not None:
    out_type.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_type += [jax.ShapeDtypeStruct((batch, padded_length, nblk, d_state), f32)] * 2
  out_type.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))
  for x in (d, bias):
    if x is not None:
      out_type.append(jax.ShapeDtypeStruct((batch, d_inner), f32))
  out_type.append(jax.ShapeDtypeStruct((batch, d_inner, d_state), f32))

  num_streams = 6 + (z is not None) + (keep is not None)
  num_consts = 2 + (d is not None) + (bias is not None)
  row_tile = lambda depth, dtype: plgpu.SMEM((depth, block_l, BLOCK_D), dtype)
  state_tile = plgpu.SMEM((BLOCK_D, d_state), f32)
  vector = lambda x: None if x is None else plgpu.SMEM((BLOCK_D,), f32)
  scratch = [
      row_tile(in_depth, u.dtype),                                     # u ring
      row_tile(in_depth, delta.dtype),                                 # delta ring
      None if z is None else row_tile(in_depth, z.dtype),              # z ring
      row_tile(in_depth, u.dtype),                                     # dout ring
      plgpu.SMEM((in_depth, block_l, d_state), B.dtype),               # B ring
      plgpu.SMEM((in_depth, block_l, d_state), C.dtype),               # C ring
      None if keep is None else plgpu.SMEM((in_depth, keep_slot(block_l)), f32),
      plgpu.SMEM((in_depth, BLOCK_D, d_state), f32),                   # saved entering states
      row_tile(out_depth, u.dtype),                                    # du rows
      row_tile(out_depth, delta.dtype),                                # ddelta rows
      None if z is None else row_tile(out_depth, z.dtype),             # dz rows
      plgpu.SMEM((out_depth, block_l, d_state), f32),                  # dB partial rows
      plgpu.SMEM((out_depth, block_l, d_state), f32),                  # dC partial rows
      plgpu.SMEM((block_l // sub, BLOCK_D, d_state), f32) if block_l > sub else None,
      state_tile, state_tile, state_tile, state_tile,                  # A, dfinal, dA, dinit
      vector(d), vector(bias), vector(d), vector(bias),                # D, bias, dD, dbias
      plgpu.Barrier(num_barriers=(num_streams, in_depth)),
      plgpu.Barrier(num_barriers=num_consts),
  ]
  kernel = functools.partial(
      _bwd_kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_keep=keep is not None, length=length, padded=length != padded_length * segments,
      segments=segments, delta_softplus=delta_softplus, block_l=block_l, sub=sub, chunks=chunks,
      in_depth=in_depth, out_depth=out_depth, per_group=d_inner // groups)
  outs = list(plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(nblk, batch),
      grid_names=("d", "b"),
      kernel_name="selective_scan_bwd_mgpu",
      **_options(interpret, d_state),
  )(*args))
  return split_bwd_outputs(outs, has_d=d is not None, has_z=z is not None,
                           has_bias=bias is not None)


def _adjoint_kernel(*refs, has_z: bool, has_bias: bool, has_keep: bool, length: int,
                    padded: bool, segments: int, delta_softplus: bool, block_l: int, chunks: int,
                    in_depth: int, per_group: int):
  """One (channel block, row) CTA of the segments' adjoint launch: from a zero cotangent at the
  row's end, g ← g + C_t dy_t, g ← ā_t ⊙ g over its positions in reverse; writes the adjoint
  entering the row, E (64, n). Refs: delta_ref, dout_ref, z_ref (b', l', d); a_ref (d, n);
  c_ref (b', l', g, n); bias_ref (d,); keep_ref (b', l'); ends_ref (b', d, n); SMEM ring slots
  dl_s, do_s, z_s (in_depth, block_l, 64), c_s (in_depth, block_l, n), keep_s; a_s, e_s
  (64, n); bias_s (64,).
  """
  refs = list(refs)
  delta_ref, a_ref, c_ref = refs[:3]
  del refs[:3]
  z_ref = refs.pop(0) if has_z else None
  bias_ref = refs.pop(0) if has_bias else None
  keep_ref = refs.pop(0) if has_keep else None
  dout_ref, ends_ref = refs[:2]
  del refs[:2]
  dl_s, do_s, z_s, c_s, keep_s, a_s, e_s, bias_s, ring_bar, const_bar = refs

  j = lax.axis_index("d")
  bi = lax.axis_index("b")
  c0 = j * BLOCK_D
  chans = pl.ds(c0, BLOCK_D)
  g = lax.div(c0, jnp.int32(per_group))
  n = a_s.shape[1]
  streams = [(delta_ref, dl_s), (dout_ref, do_s)] + ([(z_ref, z_s)] if has_z else [])

  def issue(c, slot):
    pos = pl.ds(c * block_l, block_l)
    copies = [(src.at[bi, pos, chans], dst.at[slot]) for src, dst in streams]
    copies.append((c_ref.at[bi, pos, g], c_s.at[slot]))
    if has_keep:
      copies.append((keep_ref.at[bi, pos], keep_s.at[slot, pl.ds(0, block_l)]))
    for k, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, ring_bar.at[k, slot])

  num_streams = len(streams) + 1 + has_keep
  for i in range(min(in_depth, chunks)):
    issue(jnp.int32(chunks - 1 - i), i)
  consts = [(a_ref.at[chans], a_s)] + ([(bias_ref.at[chans], bias_s)] if has_bias else [])
  load_constants(consts, const_bar)
  a2 = plgpu.load(a_s, layout=STATE) * LOG2_E
  bias = plgpu.load(bias_s, layout=CHANNEL) if has_bias else None
  row_start = lax.rem(bi, jnp.int32(segments)) * (chunks * block_l)
  by_channel = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [0])
  by_state = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [1])

  def chunk(i, gs):
    c = chunks - 1 - i
    slot = lax.rem(i, jnp.int32(in_depth))
    for k in range(num_streams):
      plgpu.barrier_wait(ring_bar.at[k, slot])

    def step(k, gs):
      row = block_l - 1 - k
      x = plgpu.load(dl_s.at[slot, row], layout=CHANNEL).astype(jnp.float32)
      if has_bias:
        x = x + bias
      dt = _softplus(x) if delta_softplus else x
      if padded:
        dt = dt * (row_start + c * block_l + row < length).astype(jnp.float32)
      decay = jnp.exp2(by_channel(dt) * a2)
      if has_keep:
        decay = decay * keep_s[slot, row]
      dy = plgpu.load(do_s.at[slot, row], layout=CHANNEL).astype(jnp.float32)
      if has_z:
        dy = dy * silu_and_grad(plgpu.load(z_s.at[slot, row],
                                           layout=CHANNEL).astype(jnp.float32))[0]
      c_t = plgpu.load(c_s.at[slot, row], layout=STATE_COL).astype(jnp.float32)
      return (gs + by_channel(dy) * by_state(c_t)) * decay

    gs = lax.fori_loop(0, block_l, step, gs)
    plgpu.commit_smem()   # every thread has read the ring slot

    @pl.when(c - in_depth >= 0)
    def _():
      issue(c - in_depth, slot)

    return gs

  gs = plgpu.layout_cast(jnp.zeros((BLOCK_D, n), jnp.float32), STATE)
  gs = lax.fori_loop(jnp.int32(0), jnp.int32(chunks), chunk, gs)
  e_s[...] = gs
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(e_s, ends_ref.at[bi, chans])
  plgpu.wait_smem_to_gmem(0)


def _launch_adjoint(delta, a, C, z, bias, keep, dout, *, length: int, segments: int,
                    delta_softplus: bool, block_l: int, interpret):
  """One launch of ``_adjoint_kernel`` over the (b · segments) rows: E (b', d, n) float32."""
  rows_total, row_length, d_inner = delta.shape
  groups, d_state = C.shape[2], C.shape[3]
  chunks = row_length // block_l
  itemsize = max(x.dtype.itemsize for x in (delta, C, z, dout) if x is not None)
  per_slot = (block_l * ((2 + (z is not None)) * BLOCK_D + d_state) * itemsize
              + 4 * keep_slot(block_l) * (keep is not None))
  in_depth = 2 if 2 * per_slot + 2 * BLOCK_D * d_state * 4 <= SMEM_BYTES else 1
  args = [delta, a, C] + [x for x in (z, bias, keep) if x is not None] + [dout]
  f32 = jnp.float32
  row_tile = lambda dtype: plgpu.SMEM((in_depth, block_l, BLOCK_D), dtype)
  scratch = [
      row_tile(delta.dtype), row_tile(dout.dtype),
      None if z is None else row_tile(z.dtype),
      plgpu.SMEM((in_depth, block_l, d_state), C.dtype),
      None if keep is None else plgpu.SMEM((in_depth, keep_slot(block_l)), f32),
      plgpu.SMEM((BLOCK_D, d_state), f32), plgpu.SMEM((BLOCK_D, d_state), f32),
      None if bias is None else plgpu.SMEM((BLOCK_D,), f32),
      plgpu.Barrier(num_barriers=(3 + (z is not None) + (keep is not None), in_depth)),
      plgpu.Barrier(num_barriers=1 + (bias is not None)),
  ]
  kernel = functools.partial(
      _adjoint_kernel, has_z=z is not None, has_bias=bias is not None,
      has_keep=keep is not None, length=length, padded=length != row_length * segments,
      segments=segments, delta_softplus=delta_softplus, block_l=block_l, chunks=chunks,
      in_depth=in_depth, per_group=d_inner // groups)
  (ends,) = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((rows_total, d_inner, d_state), f32)],
      scratch_types=scratch,
      grid=(d_inner // BLOCK_D, rows_total),
      grid_names=("d", "b"),
      kernel_name="selective_scan_bwd_ends_mgpu",
      **_options(interpret, d_state),
  )(*args)
  return ends


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "blocks",
                                             "interpret"))
def scan_bwd_mgpu(u: jax.Array, delta: jax.Array, a: jax.Array, B: jax.Array, C: jax.Array,
                  d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
                  keep: jax.Array | None, states: jax.Array, dout: jax.Array,
                  dfinal: jax.Array, *, length: int, delta_softplus: bool,
                  blocks: ScanGpuBlockSizes,
                  interpret: bool | plgpu.InterpretGPUParams = False):
  """The fused backward over the padded length on Hopper (Mosaic GPU), ``scan_bwd``'s contract
  (equations in the module docstring).

  One launch over (d / 64 channel blocks, b) CTAs when that fills the GPU; otherwise (small
  batches of long sequences) ``scan_bwd_mgpu_segments`` with the forward's ``segment_count``.

  Args:
    u, delta: (b, l, d) float32 / bf16 / fp16, l a multiple of ``blocks.block_l``.
    a: (d, n) float32, A.
    B, C: (b, l, g, n) float32 / bf16 / fp16; channel i reads group i // (d / g).
    d: optional (d,) float32 skip D.
    z: optional (b, l, d) gate.
    bias: optional (d,) float32 delta_bias.
    keep: optional (b, l) float32 decay mask from ``selective_scan_args.decay_keep``.
    states: (b, l / block_l, d, n) float32, the chunk-entering states the forward saved.
    dout: (b, l, d) cotangent of the output (used in u's dtype), zero in the padding.
    dfinal: (b, d, n) float32 cotangent of the final state.
    length: the true length (positions at or beyond it are padding: Δ = 0, ddelta = 0).
    delta_softplus: Δ = softplus(delta + bias) instead of delta + bias.
    blocks: the GPU block sizes; ``block_l`` (the interval of the saved states) and ``sub_l``
      are used: the channel block is ``BLOCK_D`` = 64 and the sub-chunk
      ``sub_rows(block_l, n, sub_l)`` positions.
    interpret: run in Mosaic GPU's interpreter (CPU); True uses the default
      ``plgpu.InterpretGPUParams()``, an instance is used as given (e.g. ``detect_races=True``).

  Returns:
    du (b, l, d) in u's dtype, ddelta (b, l, d) in delta's dtype, dz (b, l, d) in z's dtype or
    None, dB and dC partial sums per block of 64 channels (b, l, d / 64, n) float32, dA
    partials (b, d, n) float32, dD and ddelta_bias partials (b, d) float32 or None (sums over
    the rows' positions), dinitial_state (b, d, n) float32.

  Raises:
    ValueError: for sizes or dtypes the kernel does not take (``check_supported_bwd``,
      ``buffer_depths``); the message names the ``backend="triton"`` fallback.
  """
  batch, padded_length, d_inner = u.shape
  _check(u, B, states, blocks)
  segments = segment_count(batch, d_inner, padded_length, blocks.block_l)
  return scan_bwd_mgpu_segments(u, delta, a, B, C, d, z, bias, keep, states, dout, dfinal,
                                length=length, delta_softplus=delta_softplus, blocks=blocks,
                                segments=segments, interpret=interpret)


def _check(u, B, states, blocks: ScanGpuBlockSizes) -> None:
  """``check_supported_bwd``, whole chunks and the states' shape."""
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[2], B.shape[3]
  block_l = blocks.block_l
  check_supported_bwd(d_inner, groups, d_state, u.dtype, block_l)
  if padded_length % block_l:
    raise ValueError(f"the padded length {padded_length} must be a multiple of block_l="
                     f"{block_l}")
  chunks = padded_length // block_l
  if states.shape != (batch, chunks, d_inner, d_state):
    raise ValueError(f"states must have shape (b, l / block_l, d, n) = "
                     f"{(batch, chunks, d_inner, d_state)}, got {states.shape}")


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "blocks", "segments",
                                             "interpret"))
def scan_bwd_mgpu_segments(u, delta, a, B, C, d, z, bias, keep, states, dout, dfinal, *,
                           length: int, delta_softplus: bool, blocks: ScanGpuBlockSizes,
                           segments: int, interpret: bool | plgpu.InterpretGPUParams = False):
  """``scan_bwd_mgpu`` with each sequence split into ``segments`` consecutive segments of
  l_s = l / segments positions (a multiple of block_l), which multiplies the CTAs by
  ``segments`` at the price of a second (cheaper) pass. The adjoint recurrence is linear, as
  the forward's, so with P_s = Π_{t in s} ā_t (``segment_decays``):

    1. a launch over the (b · segments) segments from a zero cotangent at each segment's end
       (``_adjoint_kernel``: g ← g + C_t dy_t, g ← ā_t ⊙ g only): E_s, the adjoint entering
       segment s from its own positions;
    2. in XLA, the cotangent of the state leaving segment s: G_{S−1} = dfinal,
       G_{s−1} = P_s ⊙ G_s + E_s (float32);
    3. the full launch over the segments with dfinal = G_s and each segment's saved chunk
       states; the per-position results are the segments' side by side, the dA, dD, dbias
       partials are summed over the segments, dinitial_state is segment 0's.

  ``segments`` = 1 is the single launch. Arguments and results are ``scan_bwd_mgpu``'s.
  """
  _check(u, B, states, blocks)
  batch, padded_length, d_inner = u.shape
  d_state = a.shape[1]
  block_l = blocks.block_l
  if padded_length % (segments * block_l):
    raise ValueError(f"segments={segments} must split the padded length {padded_length} into "
                     f"whole chunks of block_l={block_l}")
  seg_length = padded_length // segments
  dout = dout.astype(u.dtype)
  sub = sub_rows(block_l, d_state, blocks.sub_l)
  launch = functools.partial(_launch, length=length, segments=segments,
                             delta_softplus=delta_softplus, block_l=block_l, sub=sub,
                             interpret=interpret)
  if segments == 1:
    return tuple(launch(u, delta, a, B, C, d, z, bias, keep, states, dout, dfinal))
  split = lambda x: None if x is None else x.reshape(batch * segments, seg_length,
                                                     *x.shape[2:])
  ends = _launch_adjoint(split(delta), a, split(C), split(z), bias, split(keep), split(dout),
                         length=length, segments=segments, delta_softplus=delta_softplus,
                         block_l=block_l, interpret=interpret)
  decay = segment_decays(delta, a, bias, keep, length=length, delta_softplus=delta_softplus,
                         segments=segments)                                   # (b, s, d, n)

  def leave(g, decay_and_end):   # g: the cotangent of the state leaving segment s
    decay_s, end_s = decay_and_end
    return decay_s * g + end_s, g

  _, leaving = lax.scan(leave, dfinal,
                        (jnp.swapaxes(decay, 0, 1),
                         jnp.swapaxes(ends.reshape(batch, segments, d_inner, d_state), 0, 1)),
                        reverse=True)
  rows_states = states.reshape(batch * segments, seg_length // block_l, d_inner, d_state)
  outs = launch(split(u), split(delta), a, split(B), split(C), d, split(z), bias, split(keep),
                rows_states, split(dout),
                jnp.swapaxes(leaving, 0, 1).reshape(batch * segments, d_inner, d_state))
  du, ddelta, dz, db, dc, da, dd, dbias, dinit = outs
  whole = lambda x: None if x is None else x.reshape(batch, padded_length, *x.shape[2:])
  summed = lambda x: None if x is None else x.reshape(batch, segments, *x.shape[1:]).sum(1)
  dinit = dinit.reshape(batch, segments, d_inner, d_state)[:, 0]
  return (whole(du), whole(ddelta), whole(dz), whole(db), whole(dc), summed(da), summed(dd),
          summed(dbias), dinit)
