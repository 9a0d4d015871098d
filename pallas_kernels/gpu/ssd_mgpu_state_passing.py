"""SSD state passing across chunks on Hopper, a Mosaic GPU kernel (forward only).

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, step 3 ("inter-chunk recurrence"), the contract of
the Triton-lowered ``ssd_state_passing.state_passing_fwd``: with the chunk-end decay lam[c]
(zero where seq_idx changes between chunk ends),

  H[-1] = initial state,   H[c] = lam[c] * H[c - 1] + S[c],

and, for the chunk scan, the same states a second time in the input dtype, so the scan's wgmma
reads them without a separate cast over the (b, c, h, p, n) states.

What it writes is what its caller needs, no more (the kernel is memory bound): every H[c] in
float32 only for the backward's residuals (``keep_all``; a forward alone gets just the final
state), the low-precision copy only of the states entering chunks 0..C-1, and no initial state
is read when there is none (``init=None``: one shared zero tile instead of a (b, h, p*n) zero
array). At 65,536 tokens, 32 heads, p 64, n 128, chunk 256 that is 268 MB of float32 stores
less for a forward, and at length 1K a further 67 MB of zeros neither filled nor read.

A short sequential loop over the chunks, parallel over batch, heads and tiles of ``TILE_ROWS``
x 128 of the flattened (p n) state. Each CTA keeps its tile of H in float32 registers and
streams S[c] through a ring of ``DEPTH`` TMA loads (issued ``DEPTH`` chunks ahead) and the two
outputs through double-buffered TMA stores. All float32 until the low-precision copy.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_mgpu_common import launch_options

LANES = 128      # the flattened state is viewed as (rows, 128)
TILE_ROWS = 8    # rows per CTA: 1024 float32 elements, 8 per thread
DEPTH = 4        # chunks of S in flight per CTA


def _kernel(s_ref, lam_ref, init_ref, all_ref, low_ref, s_buf, init_buf, h_buf, low_buf,
            s_bar, init_bar, *, chunks: int, keep_all: bool, has_init: bool):
  r = pl.ds(lax.axis_index("r") * TILE_ROWS, TILE_ROWS)
  h = lax.axis_index("h")
  bi = lax.axis_index("b")

  for c in range(min(DEPTH, chunks)):
    plgpu.copy_gmem_to_smem(s_ref.at[bi, c, h, r], s_buf.at[c], s_bar.at[c])
  init_src = init_ref.at[bi, h, r] if has_init else init_ref.at[0, 0, r]   # a shared zero tile
  plgpu.copy_gmem_to_smem(init_src, init_buf, init_bar)
  plgpu.barrier_wait(init_bar)

  def emit(c, state):
    """Write H[c - 1]: into all_states[c] in float32 (``keep_all``) and, for c < chunks, into
    low[c] in the low precision."""
    slot = lax.rem(c, jnp.int32(2))
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the stores of slot's last use are out
    if keep_all:
      h_buf.at[slot][...] = state
    if low_ref is not None:
      low_buf.at[slot][...] = state.astype(low_buf.dtype)
    plgpu.commit_smem()
    if keep_all:
      plgpu.copy_smem_to_gmem(h_buf.at[slot], all_ref.at[bi, c, h, r], commit_group=False)
    if low_ref is not None:
      @pl.when(c < chunks)
      def _():
        plgpu.copy_smem_to_gmem(low_buf.at[slot], low_ref.at[bi, c, h, r], commit_group=False)
    plgpu.commit_smem_to_gmem_group()

  state = init_buf[...]
  if keep_all or low_ref is not None:
    emit(jnp.int32(0), state)

  def body(c, state):
    slot = lax.rem(c, jnp.int32(DEPTH))
    plgpu.barrier_wait(s_bar.at[slot])
    state = lam_ref[bi, h, c] * state + s_buf.at[slot][...]
    plgpu.commit_smem()   # every thread has read the slot before TMA refills it

    @pl.when(c + DEPTH < chunks)
    def _():
      plgpu.copy_gmem_to_smem(s_ref.at[bi, c + DEPTH, h, r], s_buf.at[slot], s_bar.at[slot])

    if keep_all:
      emit(c + 1, state)
    elif low_ref is not None:
      @pl.when(c + 1 < chunks)
      def _():
        emit(c + 1, state)
    return state

  state = lax.fori_loop(jnp.int32(0), jnp.int32(chunks), body, state)
  if not keep_all:   # only the final state, from a slot no store is reading any more
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    h_buf.at[0][...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(h_buf.at[0], all_ref.at[bi, h, r])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("low_dtype", "keep_all", "interpret"))
def state_passing_fwd_mgpu(states: jax.Array, lam: jax.Array, init: jax.Array | None, *,
                           low_dtype=None, keep_all: bool = True, interpret: bool = False):
  """Chunk-boundary states H[-1..C-1] (Mamba-2 Sec. 6 step 3), and a low-precision copy.

  Args:
    states: (b, c, h, p*n) float32 per-chunk states S[c]; p*n a multiple of 1024.
    lam: (b, h, c) float32 chunk-end decays.
    init: (b, h, p*n) float32 initial states H[-1], or None for zeros.
    low_dtype: dtype of the copy of H[-1..C-2] for the chunk scan, or None for no copy.
    keep_all: return every H[c] in float32 (the backward's residuals); False returns only the
      final state H[C-1].
    interpret: run in Mosaic GPU's interpreter (CPU).

  Returns:
    all_states (b, c + 1, h, p*n) float32 (index 0 is H[-1], index c + 1 is H[c]; the last is
    the final state), or with ``keep_all=False`` the final state (b, h, p*n) float32; and the
    states entering chunks 0..C-1 in ``low_dtype``, (b, c, h, p*n) (index c is H[c - 1]), or
    None.
  """
  batch, chunks, heads, pn = states.shape
  if states.dtype != jnp.float32:
    raise ValueError(f"states must be float32, got {states.dtype}")
  if lam.shape != (batch, heads, chunks) or lam.dtype != jnp.float32:
    raise ValueError(f"lam has shape {lam.shape} dtype {lam.dtype}; expected "
                     f"({batch}, {heads}, {chunks}) float32")
  has_init = init is not None
  if not has_init:
    init = jnp.zeros((1, 1, pn), jnp.float32)
  elif init.shape != (batch, heads, pn) or init.dtype != jnp.float32:
    raise ValueError(f"init has shape {init.shape} dtype {init.dtype}; expected "
                     f"({batch}, {heads}, {pn}) float32")
  tile = TILE_ROWS * LANES
  if pn % tile:
    raise ValueError(f"p*n={pn} must be a multiple of {tile}")
  rows = pn // LANES
  as_rows = lambda v: v.reshape(*v.shape[:-1], rows, LANES)
  kept = (batch, chunks + 1, heads) if keep_all else (batch, heads)
  out_type = [jax.ShapeDtypeStruct((*kept, rows, LANES), jnp.float32)]
  if low_dtype is not None:
    out_type.append(jax.ShapeDtypeStruct((batch, chunks, heads, rows, LANES), low_dtype))
  scratch = [
      plgpu.SMEM((DEPTH, TILE_ROWS, LANES), jnp.float32),
      plgpu.SMEM((TILE_ROWS, LANES), jnp.float32),
      plgpu.SMEM((2, TILE_ROWS, LANES), jnp.float32),
      None if low_dtype is None else plgpu.SMEM((2, TILE_ROWS, LANES), low_dtype),
      plgpu.Barrier(num_barriers=DEPTH),
      plgpu.Barrier(),
  ]

  def kernel(s_ref, lam_ref, init_ref, all_ref, *rest):
    low_ref = rest[0] if low_dtype is not None else None
    _kernel(s_ref, lam_ref, init_ref, all_ref, low_ref, *rest[len(out_type) - 1:],
            chunks=chunks, keep_all=keep_all, has_init=has_init)

  outs = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=scratch,
      grid=(rows // TILE_ROWS, heads, batch),
      grid_names=("r", "h", "b"),
      kernel_name="ssd_state_passing_mgpu",
      **launch_options(interpret),
  )(as_rows(states), lam, as_rows(init))
  flat = lambda v: v.reshape(*v.shape[:-2], pn)
  return flat(outs[0]), (flat(outs[1]) if low_dtype is not None else None)
