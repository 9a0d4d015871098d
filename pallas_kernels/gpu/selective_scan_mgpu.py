"""The selective-scan (S6) forward on Hopper as one Mosaic GPU Pallas kernel (``plgpu.kernel``).

Mamba §3.2 Algorithm 2 with the simplified discretization (Mamba §2 eq. (4)) and mamba_ssm's
``selective_scan_fn`` semantics, per channel i and state k:

  Δ_t   = softplus(delta_t + delta_bias)                  (bias and softplus optional)
  h_t   = exp(Δ_t A) ⊙ keep_t h_{t−1} + Δ_t u_t B_t       (keep_t = 0 where seq_idx changes)
  y_t   = (C_t · h_t + D u_t) · silu(z_t)                  (D and z optional)

``scan_fwd_mgpu`` has exactly the arguments and results of the Triton-lowered
``selective_scan_fwd.scan_fwd`` (padded inputs, Δ = 0 beyond ``length``, the float32 state
entering every chunk of ``blocks.block_l`` positions as the backward's residual), so the
Triton-lowered backward ``selective_scan_bwd.scan_bwd`` consumes its residuals unchanged, and
so does the Mosaic GPU backward ``selective_scan_mgpu_bwd.scan_bwd_mgpu``.

Design. One CTA = one warpgroup (128 threads) per (block of ``BLOCK_D`` = 64 channels of one
group, batch row). The (64, n) float32 state lives in registers in the wgmma accumulator
layout (``plgpu.Layout.WGMMA``: 64 rows of channels, n columns of states; per-channel vectors
in its ``.reduce(1)`` layout, per-state vectors B_t, C_t in its ``.reduce(0)`` layout). The
length is walked in load chunks of ``rows`` positions (``rows`` divides ``block_l``, at most
``LOAD_ROWS``): the chunk's rows of u, delta, z (rows × 64), B, C (rows × n of the block's
group) and keep (rows,) are TMA-copied into a ring of ``depth`` shared-memory slots, issued
``depth`` chunks ahead. Per chunk, three stages:

  1. Δ = softplus(delta + bias) (0 on padding) and Δ·u for the whole (rows, 64) tile, one value
     per thread (``TILE``, a strided layout without repeats), into shared memory;
  2. a ``fori_loop`` over the positions reads one Δ and Δ·u row and the B_t, C_t rows per step,
     updates the state (all float32; exp(Δ A) per (channel, state), computed as
     2^(Δ · A log2 e)), reduces C_t · h_t over the states (shuffles inside a quad of lanes:
     the state dimension never crosses a warp) and writes it to a shared-memory row;
  3. y = (C·h + D u) · silu(z) for the tile, again one value per thread, into a
     double-buffered tile that is TMA-stored, together with the state entering each
     ``block_l`` chunk (the residual).

In the state layout the four lanes of a quad share each channel, so per-channel work inside
the serial loop (the softplus, D u, the gate) would be done four times; stages 1 and 3 do it
once, and the loop keeps only the per-(channel, state) work. The expanded state (b, l, d, n)
never reaches memory. The special functions are the hardware's approximate ones
(``APPROX_MATH``), as mamba_ssm's CUDA kernel is built with --use_fast_math.

Small batches of long sequences give too few CTAs (b · d / 64: 32 at b = 1, d = 2048, for
132 SMs), and each CTA walks its whole sequence serially. ``scan_fwd_mgpu`` then splits every
sequence into ``segment_count`` consecutive segments (whole block_l chunks, >= 256 positions)
and runs two launches (``scan_fwd_mgpu_segments``): the segments' end states from a zero state
(no y), the states entering the segments by a short float32 recurrence in XLA over the segment
decays Π keep_t · exp(A Σ Δ_t), then the full kernel from those states: twice the arithmetic,
``segments`` times the parallelism.

Compiled, the kernel runs without Pallas' automatic warpgroup barriers around every shared
memory access (``unsafe_no_auto_barriers``). Every hand-over between threads, or between
threads and the TMA unit, goes through ``commit_smem`` (a warpgroup barrier with a proxy
fence), ``wait_smem_to_gmem`` (waits for the store group, then a warpgroup barrier) or
``barrier_wait``: stage 1's rows are written before a barrier and read after it; the loop's
C·h rows likewise before stage 3 reads them; the next chunk's stage 1 overwrites the Δ rows
only after the barrier that follows the loop; a ring slot is refilled only after the barrier
that follows its last read; the y tile and saved states are rewritten only after
``wait_smem_to_gmem`` says their store two chunks back has read them. The interpreter's race
detector checks this in CI (tests/kernels/test_selective_scan_mgpu.py).

Status: its GPU tests pass on an H100 (tests/kernels/test_selective_scan_mgpu.py, d_inner 2048,
batch 1 with segments, n 32 / 64, the wrapper's vjp in float32 and bf16), and a CPU interpreter
twin runs in CI. Measured on the H100 (scripts/bench_selective_scan.py, d_inner 2048, n 16,
bf16, 65,536 tokens, one call with mamba_ssm's CUDA kernel, docs/results/s6_mosaic_h100.json):
forward 1.11 / 1.19 / 2.24 / 2.37 ms at L = 1K / 4K / 16K / 64K against CUDA's 2.09 / 2.15 /
2.60 / 2.78 ms (1.89x, 1.81x, 1.16x, 1.17x; from 16K the batch of 4 or 1 is split into
segments, which costs a second pass). ``backend="mosaic"`` pairs it with the Mosaic GPU
backward of ``selective_scan_mgpu_bwd``: forward+backward 7.78 / 7.90 / 9.83 / 9.98 ms
against CUDA's 11.32 / 11.77 / 12.37 / 13.73 (1.45x, 1.49x, 1.26x, 1.38x); ``impl="pallas"``
runs that pair on Hopper. At d_inner 5120 (docs/results/s6_mosaic_d5120_h100.json): forward
2.05x / 1.95x / 1.77x / 1.07x, forward+backward 1.47x / 1.52x / 1.16x / 1.00x. The steps
that got here, each measured in one call against the same CUDA kernel: the approximate
special functions (forward 1.90 -> 1.22 ms at 1K, 3.70 -> 2.53 at 16K), the chunk-wide
stages 1 and 3 (-> 1.19 / 2.38) and load chunks of 16 positions instead of 32 (-> 1.13 /
2.30, the smaller buffers fit more CTAs per SM). At 1K the loop is bound by instruction issue
(ncu: 74 % of issue slots busy, 94 warp instructions per position and 16 channels, 9 of them
special-function ex2 / lg2): a faster forward needs fewer instructions per (channel, state),
not more overlap.

Limits (each raises ValueError naming the ``backend="triton"`` fallback): d_inner / groups a
multiple of 64 channels; d_state a multiple of 8 (the wgmma layout's column tile; TMA rows of
at least 16 bytes); block_l a multiple of 8; the buffers of one CTA must fit Hopper's shared
memory.

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

from pallas_kernels.gpu.selective_scan_args import sigmoid
from pallas_kernels.gpu.selective_scan_fwd import ScanGpuBlockSizes

BLOCK_D = 64          # channels per CTA: the wgmma layout's row tile (one warpgroup)
# LOAD_ROWS 16 against 32 (the stages' buffers double with it): forward 1.13 / 1.23 / 2.30 ms
# against 1.19 / 1.33 / 2.38 at L = 1K / 4K / 16K on an H100 (d 2048, N 16, bf16).
LOAD_ROWS = 16        # at most this many positions per TMA load chunk
KEEP_ALIGN = 32       # keep's ring slots hold a multiple of 32 floats: 128 bytes, the alignment
                      # of a TMA target (16 rows of 4 bytes would misalign every other slot)
MIN_BLOCK_L = 8       # block_l a multiple of this: TMA rows of keep are >= 32 bytes
STATE_COLUMNS = 8     # d_state must be a multiple of the wgmma layout's column tile
SMEM_BYTES = 227 * 1024 - 4096   # Hopper's 227 KiB per CTA, less barriers and slack
UNROLL = 4            # positions per unrolled step block when compiled (ILP across steps)
LOG2_E = 1.4426950408889634
TARGET_CTAS = 2 * 132  # split sequences into segments below two CTAs per SM of an H100
MIN_SEGMENT = 256      # ... but into no segment shorter than this many positions
# exp2 / exp / log as one special-function instruction each (ex2.approx.ftz.f32,
# lg2.approx.ftz.f32: relative error about 2^-22, denormal results flushed to 0), as mamba_ssm's
# CUDA kernels get from --use_fast_math. Without it each exp2 carries denormal handling and each
# log a software polynomial: on an H100 (d 2048, N 16, bf16, 65,536 tokens) the forward took
# 1.90 / 3.70 ms at L = 1K / 16K against 1.22 / 2.53 with it, forward+backward 10.6 / 14.2
# against 8.0 / 10.4.
APPROX_MATH = True

STATE = plgpu.Layout.WGMMA                  # (BLOCK_D, n): one row per channel
CHANNEL = plgpu.Layout.WGMMA.reduce(1)      # (BLOCK_D,): one value per channel
STATE_COL = plgpu.Layout.WGMMA.reduce(0)    # (n,): one value per state
# (rows, 64) tiles of a load chunk, one value per thread and register pair (no repeats):
TILE = lambda rows: plgpu.Layout.WG_STRIDED((rows, BLOCK_D), vec_size=2)


def load_constants(copies, barriers) -> None:
  """TMA-load each (gmem src, smem dst) of ``copies`` on its own barrier of ``barriers``, all
  in flight at once, then wait for every one (a CTA's per-channel constants: A, D, ...)."""
  for k, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, barriers.at[k])
  for k in range(len(copies)):
    plgpu.barrier_wait(barriers.at[k])


def _softplus(x):
  """log(1 + eˣ) = max(x, 0) + log(1 + e^−|x|) (Mosaic GPU has no log1p; the absolute error
  of the log is below float32's ulp of the result)."""
  return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def load_rows(block_l: int) -> int:
  """Positions per TMA load chunk: the largest divisor of block_l that is at most LOAD_ROWS."""
  return math.gcd(block_l, LOAD_ROWS) if block_l % LOAD_ROWS else LOAD_ROWS


def keep_slot(rows: int) -> int:
  """Floats per ring slot of keep: ``rows`` rounded up to a multiple of KEEP_ALIGN."""
  return -(-rows // KEEP_ALIGN) * KEEP_ALIGN


def _smem_bytes(depth: int, rows: int, n: int, itemsize: int, *, has_z: bool, has_keep: bool,
                save_states: bool) -> int:
  """Shared memory of one CTA: the input ring, the chunk's Δ, Δ·u and C·h rows (float32), the
  y / state output buffers, A, h0 and h_final."""
  per_slot = (rows * ((2 + has_z) * BLOCK_D * itemsize + 2 * n * itemsize)
              + 4 * keep_slot(rows) * has_keep)
  chunk_rows = 3 * rows * BLOCK_D * 4
  outputs = 2 * rows * BLOCK_D * itemsize + (2 * BLOCK_D * n * 4 if save_states else 0)
  fixed = 3 * BLOCK_D * n * 4
  return depth * per_slot + chunk_rows + outputs + fixed


def ring_depth(rows: int, n: int, itemsize: int, *, has_z: bool, has_keep: bool,
               save_states: bool) -> int:
  """Load chunks in flight (3, else 2) such that one CTA's buffers fit shared memory."""
  for depth in (3, 2):
    if _smem_bytes(depth, rows, n, itemsize, has_z=has_z, has_keep=has_keep,
                   save_states=save_states) <= SMEM_BYTES:
      return depth
  need = _smem_bytes(2, rows, n, itemsize, has_z=has_z, has_keep=has_keep,
                     save_states=save_states)
  raise ValueError(f"d_state n={n} needs {need} bytes of shared memory per CTA > {SMEM_BYTES} "
                   "in the Mosaic GPU selective scan; use backend=\"triton\"")


def check_supported(d_inner: int, groups: int, d_state: int, dtype) -> None:
  """Raises ValueError (naming the ``backend="triton"`` fallback) unless the kernel takes these
  sizes: every channel block of BLOCK_D lies in one group, n is a multiple of STATE_COLUMNS."""
  per_group = d_inner // groups
  if per_group % BLOCK_D:
    raise ValueError(f"d_inner / groups = {per_group} (d_inner={d_inner}, groups={groups}) must "
                     f"be a multiple of {BLOCK_D} for the Mosaic GPU selective scan; use "
                     "backend=\"triton\"")
  if d_state % STATE_COLUMNS:
    raise ValueError(f"d_state={d_state} must be a multiple of {STATE_COLUMNS} for the Mosaic "
                     "GPU selective scan; use backend=\"triton\"")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                              jnp.dtype(jnp.float16)):
    raise ValueError(f"u dtype {jnp.dtype(dtype)} must be float32, bfloat16 or float16 for the "
                     "Mosaic GPU selective scan; use backend=\"triton\"")


def _kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_init: bool, has_keep: bool,
            with_y: bool, save_states: bool, length: int, padded: bool, segments: int,
            delta_softplus: bool, rows: int, chunks_per_state: int, chunks: int, depth: int,
            per_group: int, unroll: int):
  """One (channel block, row) CTA; refs in the order built by ``_launch``. A row is one of the
  ``segments`` consecutive pieces of a batch row's length (row bi = batch · segments + s), so
  its position t is the padded sequence's s · l_row + t (only for the padding mask).

  GMEM (b' rows of l' positions): u_ref, delta_ref, z_ref, y_ref (b', l', d); a_ref (d, n)
  float32; b_ref, c_ref (b', l', g, n); d_ref, bias_ref (rows, d) float32 (D and delta_bias
  repeated over the ``rows`` of a load chunk); init_ref, final_ref (b', d, n) float32; keep_ref
  (b', l') float32; states_ref (b', l' / block_l, d, n) float32.
  SMEM: ring slots u_s, dl_s, z_s (depth, rows, 64), b_s, c_s (depth, rows, n), keep_s
  (depth, keep_slot(rows)); dt_s, dtu_s (rows, 64) float32 (the chunk's Δ and Δ·u; at the
  start they stage the bias and D tiles); yc_s (rows, 64) float32 (the chunk's C·h); y_s (2,
  rows, 64); h_s (2, 64, n); a_s, h0_s, hf_s (64, n). Without y (``with_y`` False: the
  segments' end states) there are no C, z, D, y.

  Per load chunk: (1) the chunk's Δ = softplus(delta + bias) (0 on padding) and Δ·u, each
  value computed once by one thread (``TILE``), into dt_s / dtu_s; (2) the recurrence position
  by position in the state layout, reading those rows, writing C_t · h_t into yc_s; (3) y =
  (C·h + D u) · silu(z) over the chunk, again once per value, into the y tile that TMA stores.
  Steps (1) and (3) take per-channel work out of the serial loop, where the state layout would
  repeat it in the four lanes that share a channel.
  """
  refs = list(refs)
  u_ref, delta_ref, a_ref, b_ref, c_ref = refs[:5]
  del refs[:5]
  d_ref = refs.pop(0) if has_d else None
  z_ref = refs.pop(0) if has_z else None
  bias_ref = refs.pop(0) if has_bias else None
  init_ref = refs.pop(0) if has_init else None
  keep_ref = refs.pop(0) if has_keep else None
  y_ref = refs.pop(0) if with_y else None
  final_ref = refs.pop(0)
  states_ref = refs.pop(0) if save_states else None
  (u_s, dl_s, z_s, b_s, c_s, keep_s, dt_s, dtu_s, yc_s, y_s, h_s, a_s, h0_s, hf_s,
   ring_bar, const_bar) = refs

  j = lax.axis_index("d")
  bi = lax.axis_index("b")
  c0 = j * BLOCK_D
  chans = pl.ds(c0, BLOCK_D)
  g = lax.div(c0, jnp.int32(per_group))
  n = a_s.shape[1]
  f32 = jnp.float32
  tile = TILE(rows)

  streams = [(u_ref, u_s), (delta_ref, dl_s)]
  if has_z:
    streams.append((z_ref, z_s))
  group_streams = [(b_ref, b_s), (c_ref, c_s)] if with_y else [(b_ref, b_s)]   # C: y only

  def issue(c, slot):
    """Start the TMA loads of load chunk c into ring slot ``slot`` (one barrier per stream)."""
    pos = pl.ds(c * rows, rows)
    k = 0
    for src, dst in streams:
      plgpu.copy_gmem_to_smem(src.at[bi, pos, chans], dst.at[slot], ring_bar.at[k, slot])
      k += 1
    for src, dst in group_streams:
      plgpu.copy_gmem_to_smem(src.at[bi, pos, g], dst.at[slot], ring_bar.at[k, slot])
      k += 1
    if has_keep:   # keep_s rows are keep_slot(rows) long: every slot starts 128-byte aligned
      plgpu.copy_gmem_to_smem(keep_ref.at[bi, pos], keep_s.at[slot, pl.ds(0, rows)],
                              ring_bar.at[k, slot])

  num_streams = len(streams) + len(group_streams) + has_keep
  for c in range(min(depth, chunks)):
    issue(jnp.int32(c), c)
  has_skip = has_d and with_y
  consts = [(a_ref.at[chans], a_s)]
  if has_init:
    consts.append((init_ref.at[bi, chans], h0_s))
  if has_bias:   # staged in dt_s / dtu_s, which the first chunk overwrites
    consts.append((bias_ref.at[:, chans], dt_s))
  if has_skip:
    consts.append((d_ref.at[:, chans], dtu_s))
  load_constants(consts, const_bar)

  a2 = plgpu.load(a_s, layout=STATE) * LOG2_E   # exp(Δ A) = 2^(Δ A log2 e): one ex2 each
  bias = plgpu.load(dt_s, layout=tile) if has_bias else None
  d_skip = plgpu.load(dtu_s, layout=tile) if has_skip else None
  row_start = lax.rem(bi, jnp.int32(segments)) * (chunks * rows)   # position of the row's t = 0
  if has_init:
    h = plgpu.load(h0_s, layout=STATE)
  else:
    h = plgpu.layout_cast(jnp.zeros((BLOCK_D, n), f32), STATE)
  if padded:
    row_index = plgpu.broadcasted_iota(jnp.int32, (rows, BLOCK_D), 0, layout=tile)
  by_channel = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [0])
  by_state = lambda v: lax.broadcast_in_dim(v, (BLOCK_D, n), [1])
  load_tile = lambda ref: plgpu.load(ref, layout=tile).astype(f32)

  def chunk(c, h):
    slot = lax.rem(c, jnp.int32(depth))
    out = lax.rem(c, jnp.int32(2))
    for k in range(num_streams):
      plgpu.barrier_wait(ring_bar.at[k, slot])
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # chunk c − 2's stores have read y_s[out]
    if save_states:
      state_slot = lax.rem(lax.div(c, jnp.int32(chunks_per_state)), jnp.int32(2))
      if chunks_per_state == 1:
        h_s.at[state_slot][...] = h
      else:
        @pl.when(lax.rem(c, jnp.int32(chunks_per_state)) == 0)
        def _():
          h_s.at[state_slot][...] = h

    # (1) Δ and Δ·u of the chunk, (rows, 64), one thread per value.
    x = load_tile(dl_s.at[slot])
    if has_bias:
      x = x + bias
    dt = _softplus(x) if delta_softplus else x
    if padded:   # Δ = 0 on padding: the state passes through unchanged
      dt = dt * (row_index + (row_start + c * rows) < length).astype(f32)
    dt_s[...] = dt
    dtu_s[...] = dt * load_tile(u_s.at[slot])
    plgpu.commit_smem()   # every thread's Δ rows are visible to every thread

    # (2) the recurrence, one position per step.
    def step(i, h):
      dt = plgpu.load(dt_s.at[i], layout=CHANNEL)
      decay = jnp.exp2(by_channel(dt) * a2)
      if has_keep:
        decay = decay * keep_s[slot, i]
      b_t = plgpu.load(b_s.at[slot, i], layout=STATE_COL).astype(f32)
      h = decay * h + by_channel(plgpu.load(dtu_s.at[i], layout=CHANNEL)) * by_state(b_t)
      if with_y:
        c_t = plgpu.load(c_s.at[slot, i], layout=STATE_COL).astype(f32)
        yc_s.at[i][...] = jnp.sum(h * by_state(c_t), axis=1)
      return h

    h = lax.fori_loop(0, rows, step, h, unroll=unroll)
    plgpu.commit_smem()   # the C·h rows are visible; every thread has read the Δ rows and B, C

    # (3) y = (C·h + D u) · silu(z) of the chunk, one thread per value.
    if with_y:
      y = plgpu.load(yc_s, layout=tile)
      if has_skip:
        y = y + d_skip * load_tile(u_s.at[slot])
      if has_z:
        zt = load_tile(z_s.at[slot])
        y = y * zt * sigmoid(zt)
      y_s.at[out][...] = y.astype(y_s.dtype)
      plgpu.commit_smem()   # the y rows are visible to TMA; every thread has read the slot

    @pl.when(c + depth < chunks)
    def _():
      issue(c + depth, slot)

    if with_y:
      plgpu.copy_smem_to_gmem(y_s.at[out], y_ref.at[bi, pl.ds(c * rows, rows), chans],
                              commit_group=False)
    if save_states:
      if chunks_per_state == 1:
        plgpu.copy_smem_to_gmem(h_s.at[state_slot], states_ref.at[bi, c, chans],
                                commit_group=False)
      else:
        @pl.when(lax.rem(c, jnp.int32(chunks_per_state)) == 0)
        def _():
          plgpu.copy_smem_to_gmem(
              h_s.at[state_slot],
              states_ref.at[bi, lax.div(c, jnp.int32(chunks_per_state)), chans],
              commit_group=False)
    if with_y or save_states:
      plgpu.commit_smem_to_gmem_group()
    return h

  h = lax.fori_loop(jnp.int32(0), jnp.int32(chunks), chunk, h)
  hf_s[...] = h
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(hf_s, final_ref.at[bi, chans])
  plgpu.wait_smem_to_gmem(0)


def _launch(u, delta, a, B, C, d, z, bias, init, keep, *, length: int, segments: int,
            delta_softplus: bool, with_y: bool, save_states: bool, block_l: int, interpret):
  """One kernel launch over rows (b', l', d) that are ``segments`` consecutive pieces of each
  padded sequence (b' = b · segments; 1: whole sequences). Returns [y (b', l', d)], the final
  state (b', d, n) and [the states entering each block_l chunk, (b', l' / block_l, d, n)]."""
  rows_total, row_length, d_inner = u.shape
  groups, d_state = B.shape[2], B.shape[3]
  rows = load_rows(block_l)
  chunks = row_length // rows
  dtype = u.dtype
  itemsize = max(x.dtype.itemsize for x in (u, delta, B, C, z) if x is not None)
  depth = ring_depth(rows, d_state, itemsize, has_z=z is not None, has_keep=keep is not None,
                     save_states=save_states)
  f32 = jnp.float32
  if not with_y:
    d = None
  # D and delta_bias as (rows, d) tiles: TMA-loaded once per CTA in the per-value layout.
  tile_rows = lambda v: None if v is None else jnp.broadcast_to(v.astype(f32), (rows, d_inner))
  args = [u, delta, a, B, C]
  for x in (tile_rows(d), z, tile_rows(bias), init, keep):
    if x is not None:
      args.append(x)
  out_type = [jax.ShapeDtypeStruct((rows_total, d_inner, d_state), f32)]
  if with_y:
    out_type.insert(0, jax.ShapeDtypeStruct(u.shape, dtype))
  if save_states:
    out_type.append(jax.ShapeDtypeStruct((rows_total, row_length // block_l, d_inner, d_state),
                                         f32))
  num_streams = 3 + with_y + (z is not None) + (keep is not None)
  num_consts = 1 + (init is not None) + (d is not None) + (bias is not None)
  scratch = [
      plgpu.SMEM((depth, rows, BLOCK_D), dtype),                    # u ring
      plgpu.SMEM((depth, rows, BLOCK_D), delta.dtype),              # delta ring
      None if z is None else plgpu.SMEM((depth, rows, BLOCK_D), z.dtype),
      plgpu.SMEM((depth, rows, d_state), B.dtype),                  # B ring
      plgpu.SMEM((depth, rows, d_state), C.dtype) if with_y else None,   # C ring
      None if keep is None else plgpu.SMEM((depth, keep_slot(rows)), f32),
      plgpu.SMEM((rows, BLOCK_D), f32),                             # Δ rows (bias at start)
      plgpu.SMEM((rows, BLOCK_D), f32),                             # Δ·u rows (D at start)
      plgpu.SMEM((rows, BLOCK_D), f32) if with_y else None,         # C·h rows
      plgpu.SMEM((2, rows, BLOCK_D), dtype) if with_y else None,    # y rows (double-buffered)
      plgpu.SMEM((2, BLOCK_D, d_state), f32) if save_states else None,
      plgpu.SMEM((BLOCK_D, d_state), f32),                          # A
      plgpu.SMEM((BLOCK_D, d_state), f32) if init is not None else None,
      plgpu.SMEM((BLOCK_D, d_state), f32),                          # final state
      plgpu.Barrier(num_barriers=(num_streams, depth)),
      plgpu.Barrier(num_barriers=num_consts),
  ]
  kernel = functools.partial(
      _kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_init=init is not None, has_keep=keep is not None, with_y=with_y,
      save_states=save_states, length=length,
      padded=length != row_length * segments, segments=segments,
      delta_softplus=delta_softplus, rows=rows, chunks_per_state=block_l // rows,
      chunks=chunks, depth=depth, per_group=d_inner // groups,
      unroll=1 if interpret else min(UNROLL, rows))
  if interpret:
    params = interpret if isinstance(interpret, plgpu.InterpretGPUParams) else (
        plgpu.InterpretGPUParams())
    options = dict(interpret=params)
  else:
    options = dict(compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True,
                                                        approx_math=APPROX_MATH))
  return plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(d_inner // BLOCK_D, rows_total),
      grid_names=("d", "b"),
      kernel_name="selective_scan_fwd_mgpu" if with_y else "selective_scan_ends_mgpu",
      **options,
  )(*args)


def segment_count(batch: int, d_inner: int, padded_length: int, block_l: int) -> int:
  """How many consecutive segments each sequence is split into (a power of two): doubled while
  the grid has fewer than ``TARGET_CTAS`` CTAs, the segments stay a whole number of block_l
  chunks and at least ``MIN_SEGMENT`` positions long. 1 (no split) whenever batch · d / 64 CTAs
  already fill the GPU."""
  ctas = batch * (d_inner // BLOCK_D)
  chunks = padded_length // block_l
  segments = 1
  while (ctas * segments < TARGET_CTAS and chunks % (2 * segments) == 0
         and padded_length // (2 * segments) >= MIN_SEGMENT):
    segments *= 2
  return segments


def _check(u, B, blocks: ScanGpuBlockSizes) -> None:
  """The sizes the kernel takes (``check_supported``) and block_l's constraints."""
  _, padded_length, d_inner = u.shape
  check_supported(d_inner, B.shape[2], B.shape[3], u.dtype)
  block_l = blocks.block_l
  if block_l % MIN_BLOCK_L:
    raise ValueError(f"block_l={block_l} must be a multiple of {MIN_BLOCK_L} for the Mosaic GPU "
                     "selective scan (TMA rows of at least 32 bytes); use backend=\"triton\"")
  if padded_length % block_l:
    raise ValueError(f"the padded length {padded_length} must be a multiple of block_l="
                     f"{block_l}")


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "save_states",
                                             "blocks", "interpret"))
def scan_fwd_mgpu(u: jax.Array, delta: jax.Array, a: jax.Array, B: jax.Array, C: jax.Array,
                  d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
                  init: jax.Array | None, keep: jax.Array | None, *, length: int,
                  delta_softplus: bool, save_states: bool, blocks: ScanGpuBlockSizes,
                  interpret: bool | plgpu.InterpretGPUParams = False):
  """The fused forward over the padded length on Hopper (Mosaic GPU), ``scan_fwd``'s contract.

      Δ_t = softplus(delta_t + bias),  h_t = exp(Δ_t A) ⊙ keep_t h_{t−1} + Δ_t u_t B_t,
      y_t = (C_t · h_t + D u_t) · silu(z_t)

  One launch over (d / 64 channel blocks, b) CTAs when that fills the GPU; otherwise (small
  batches of long sequences) ``scan_fwd_mgpu_segments`` with ``segment_count`` segments.

  Args:
    u, delta: (b, l, d) float32 / bf16 / fp16, l a multiple of ``blocks.block_l``.
    a: (d, n) float32, A.
    B, C: (b, l, g, n) float32 / bf16 / fp16; channel i reads group i // (d / g).
    d: optional (d,) float32 skip D.
    z: optional (b, l, d) gate.
    bias: optional (d,) float32 delta_bias.
    init: optional (b, d, n) float32 initial state.
    keep: optional (b, l) float32 decay mask from ``selective_scan_args.decay_keep``.
    length: the true length (positions at or beyond it are padding: Δ = 0 there).
    delta_softplus: Δ = softplus(delta + bias) instead of delta + bias.
    save_states: also return the chunk-entering states.
    blocks: the GPU block sizes; only ``block_l`` (the interval of the saved states) is used
      here: the channel block is ``BLOCK_D`` and the load chunk ``load_rows(block_l)``.
    interpret: run in Mosaic GPU's interpreter (CPU); True uses the default
      ``plgpu.InterpretGPUParams()``, an instance is used as given (e.g. ``detect_races=True``).

  Returns:
    y (b, l, d) in u's dtype, the final state (b, d, n) float32, and with ``save_states`` the
    state entering every chunk of block_l positions, (b, l / block_l, d, n) float32.

  Raises:
    ValueError: for sizes or dtypes the kernel does not take (``check_supported``,
      ``ring_depth``, block_l not a multiple of 8); the message names the
      ``backend="triton"`` fallback.
  """
  _check(u, B, blocks)
  batch, padded_length, d_inner = u.shape
  segments = segment_count(batch, d_inner, padded_length, blocks.block_l)
  return scan_fwd_mgpu_segments(u, delta, a, B, C, d, z, bias, init, keep, length=length,
                                delta_softplus=delta_softplus, save_states=save_states,
                                blocks=blocks, segments=segments, interpret=interpret)


def segment_decays(delta, a, bias, keep, *, length: int, delta_softplus: bool,
                   segments: int) -> jax.Array:
  """The decay across each of ``segments`` consecutive segments of the padded sequences,
  P_s = Π_{t in s} keep_t exp(Δ_t A) = Π_t keep_t · exp(A Σ_t Δ_t), (b, segments, d, n) float32
  (Δ as the kernels compute it, 0 on padding; delta (b, l, d), a (d, n), bias (d,) or None,
  keep (b, l) or None)."""
  batch, padded_length, d_inner = delta.shape
  seg_length = padded_length // segments
  x = delta.astype(jnp.float32)
  if bias is not None:
    x = x + bias
  dt = _softplus(x) if delta_softplus else x
  dt = jnp.where(jnp.arange(padded_length)[None, :, None] < length, dt, 0.0)
  dt_sum = dt.reshape(batch, segments, seg_length, d_inner).sum(2)              # (b, s, d)
  decay = jnp.exp(dt_sum[..., None] * a)                                          # (b, s, d, n)
  if keep is not None:
    decay = decay * jnp.prod(keep.reshape(batch, segments, seg_length), 2)[..., None, None]
  return decay


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "save_states",
                                             "blocks", "segments", "interpret"))
def scan_fwd_mgpu_segments(u, delta, a, B, C, d, z, bias, init, keep, *, length: int,
                           delta_softplus: bool, save_states: bool,
                           blocks: ScanGpuBlockSizes, segments: int,
                           interpret: bool | plgpu.InterpretGPUParams = False):
  """``scan_fwd_mgpu`` with each sequence split into ``segments`` consecutive segments of
  l_s = l / segments positions (a multiple of block_l), which multiplies the CTAs by
  ``segments`` at the price of a second pass:

    1. a launch over the (b · segments) segments from a zero state, without y: each segment's
       end state E_s;
    2. in XLA, the state entering segment s: H_0 = h0, H_{s+1} = P_s ⊙ H_s + E_s with the
       segment's decay P_s = Π_t keep_t · exp(A Σ_t Δ_t) (float32; Δ as the kernel computes it,
       0 on padding);
    3. the full launch over the segments from H_s: y, the saved chunk states, the final state.

  ``segments`` = 1 is the single launch. Arguments and results are ``scan_fwd_mgpu``'s.
  """
  _check(u, B, blocks)
  batch, padded_length, d_inner = u.shape
  d_state = a.shape[1]
  if padded_length % (segments * blocks.block_l):
    raise ValueError(f"segments={segments} must split the padded length {padded_length} into "
                     f"whole chunks of block_l={blocks.block_l}")
  seg_length = padded_length // segments
  launch = functools.partial(_launch, length=length, segments=segments,
                             delta_softplus=delta_softplus, block_l=blocks.block_l,
                             interpret=interpret)
  if segments == 1:
    return tuple(launch(u, delta, a, B, C, d, z, bias, init, keep, with_y=True,
                        save_states=save_states))
  split = lambda x: None if x is None else x.reshape(batch * segments, seg_length,
                                                     *x.shape[2:])
  (ends,) = launch(split(u), split(delta), a, split(B), split(C), None, None, bias, None,
                   split(keep), with_y=False, save_states=False)
  decay = segment_decays(delta, a, bias, keep, length=length, delta_softplus=delta_softplus,
                         segments=segments)
  h0 = jnp.zeros((batch, d_inner, d_state), jnp.float32) if init is None else init

  def enter(h, decay_and_end):
    decay_s, end_s = decay_and_end
    return decay_s * h + end_s, h

  _, entering = lax.scan(enter, h0, (jnp.swapaxes(decay, 0, 1),
                                     jnp.swapaxes(ends.reshape(batch, segments, d_inner,
                                                               d_state), 0, 1)))
  outs = launch(split(u), split(delta), a, split(B), split(C), d, split(z), bias,
                jnp.swapaxes(entering, 0, 1).reshape(batch * segments, d_inner, d_state),
                split(keep), with_y=True, save_states=save_states)
  y = outs[0].reshape(u.shape)
  final = outs[1].reshape(batch, segments, d_inner, d_state)[:, -1]
  if not save_states:
    return y, final
  states = outs[2].reshape(batch, padded_length // blocks.block_l, d_inner, d_state)
  return y, final, states
