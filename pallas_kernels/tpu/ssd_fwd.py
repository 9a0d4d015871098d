"""The forward SSD (Mamba-2) chunk loop as one Pallas Mosaic TPU kernel.

Per (batch row, block of heads of one group), the kernel walks the chunks in order and carries
the state h (p, n) float32 of every head in VMEM scratch. For chunk c with inputs X (q, p),
B, C (q, n) and the per-position vectors of the wrapper (cs = within-chunk cumsum of dt·A,
dt, w_in = exp(cs_t) masked to the segment entering the chunk, w_out = exp(cs_last - cs_s)·dt_s
masked to the segment leaving it), Mamba-2 §6 ("SSD algorithm", Listing 1) becomes:

  diagonal block      y  = ((C Bᵀ) ∘ L ∘ dtᵀ) X,   L[t, s] = exp(cs_t - cs_s) [t >= s, same id]
  off-diagonal block  y += w_in ∘ (C h_{c-1}ᵀ)
  skip and gate       y  = (y + D ∘ X) · silu(z)
  state update        h_c = w_in[q-1] · h_{c-1} + (w_out ∘ X)ᵀ B

C Bᵀ and the mask are shared by the heads of a block (they read one group). The state passing is
fused into the chunk loop instead of running as a separate scan over chunk states: each
(b, head block) program is sequential over chunks, and the batch and head-block axes give the
parallelism (megacore splits them over its two TensorCores). On TPU a grid step is a serial
iteration of one core anyway, so a separate state-passing kernel would only add a round trip of
the (b, c, h, p, n) chunk states through HBM — as large as x when n = q / 2. The chunk states are
written only when the backward needs them (``save_states``).

Matmul operands are in the input dtype (bf16 on the MXU; float32 inputs contract at full float32
precision; fp16, which the MXU lacks, is computed as float32); all accumulation, the state and
the decays are float32. Speed on a real TPU is unmeasured: this kernel was run only in the TPU
interpreter on CPU, and lowered to Mosaic without compiling.

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
from pallas_kernels.tpu.ssd_blocks import CS, DT, SEG, VEC_ROWS, W_IN, W_OUT, SSDTpuBlockSizes


def matmul_dtype(dtype) -> jnp.dtype:
  """The MXU operand dtype for inputs of ``dtype``: bf16 stays, fp16 and float32 -> float32."""
  return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def _ssd_fwd_kernel(*refs, has_d: bool, has_z: bool, has_init: bool, has_seq: bool,
                    save_states: bool):
  """One (b, head block, chunk) step; refs in the order built by ``ssd_fwd``.

  x_ref, z_ref (r, q, p); b_ref, c_ref (q, n); vec_ref (r, 5, q) float32; d_ref (r, 1, p);
  init_ref (r, p, n); outputs y_ref (r, q, p), states_ref (r, p, n) (the state entering this
  chunk), final_ref (r, p, n); scratch state_ref (r, p, n) float32.
  """
  refs = list(refs)
  x_ref, b_ref, c_ref, vec_ref = refs[:4]
  del refs[:4]
  d_ref = refs.pop(0) if has_d else None
  z_ref = refs.pop(0) if has_z else None
  init_ref = refs.pop(0) if has_init else None
  y_ref = refs.pop(0)
  states_ref = refs.pop(0) if save_states else None
  final_ref, state_ref = refs

  chunk = pl.program_id(2)
  heads, q, _ = x_ref.shape
  mm = matmul_dtype(x_ref.dtype)

  @pl.when(chunk == 0)
  def _():
    if has_init:
      state_ref[...] = init_ref[...]
    else:
      state_ref[...] = jnp.zeros_like(state_ref)

  b = b_ref[...].astype(mm)
  c = c_ref[...].astype(mm)
  keep = ssd_tiles.causal_mask(q, vec_ref[0, SEG:SEG + 1, :] if has_seq else None)
  scores = jnp.where(keep, ssd_tiles.matmul(c, b, 1, 1), 0.0)  # (q, q): C_t · B_s

  def head(i, carry):
    vec = vec_ref[i]  # (5, q)
    dt_row = vec[DT:DT + 1]
    w_in_row = vec[W_IN:W_IN + 1]
    x = x_ref[i].astype(jnp.float32)  # (q, p)
    h_prev = state_ref[i]  # (p, n)
    weights = scores * ssd_tiles.decay_mask(vec[CS:CS + 1], keep) * dt_row
    y = ssd_tiles.matmul(weights.astype(mm), x.astype(mm), 1, 0)
    y += ssd_tiles.row_to_col(w_in_row) * ssd_tiles.matmul(c, h_prev.astype(mm), 1, 1)
    if has_d:
      y += d_ref[i] * x
    if has_z:
      y *= jax.nn.silu(z_ref[i].astype(jnp.float32))
    y_ref[i] = y.astype(y_ref.dtype)
    if save_states:
      states_ref[i] = h_prev
    x_out = (x * ssd_tiles.row_to_col(vec[W_OUT:W_OUT + 1])).astype(mm)
    state_ref[i] = ssd_tiles.last_entry(w_in_row) * h_prev + ssd_tiles.matmul(x_out, b, 0, 0)
    return carry

  lax.fori_loop(0, heads, head, 0)

  @pl.when(chunk == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state_ref[...]


@functools.partial(jax.jit, static_argnames=("blocks", "has_seq", "save_states", "interpret"))
def ssd_fwd(x: jax.Array, B: jax.Array, C: jax.Array, vec: jax.Array, d: jax.Array | None,
            z: jax.Array | None, initial_states: jax.Array | None, *, blocks: SSDTpuBlockSizes,
            has_seq: bool, save_states: bool, interpret=False):
  """The SSD forward over all chunks (Mamba-2 §6), in the kernel layout.

  Args:
    x: (b, h, l, p) float32 / bf16 / fp16, l a multiple of q = ``blocks.chunk_size``.
    B, C: (b, g, l, n) in x's dtype; head i reads group i // (h // g).
    vec: (b, h, c, 5, q) float32 per-position rows cs, dt, w_in, w_out, seg (see the module
      docstring; seg is the chunk-local segment id as a float).
    d: optional (h, 1, p) float32 skip D per channel.
    z: optional (b, h, l, p) gate in x's dtype.
    initial_states: optional (b, h, p, n) float32.
    blocks: block sizes (q, heads per block, VMEM limit).
    has_seq: mask the diagonal blocks by the seg row (packed sequences).
    save_states: also return the state entering every chunk.
    interpret: False, or ``pltpu.InterpretParams()`` to run in the TPU interpreter.

  Returns:
    y (b, h, l, p) in x's dtype; final states (b, h, p, n) float32; with ``save_states`` also
    the entering states (b, h, c, p, n) float32.
  """
  batch, heads, length, head_dim = x.shape
  groups, d_state = B.shape[1], B.shape[3]
  q, r = blocks.chunk_size, blocks.heads_per_block
  chunks = length // q
  blocks_per_group = heads // groups // r

  head_tile = lambda bi, hj, ci: (bi, hj, ci, 0)
  group_tile = lambda bi, hj, ci: (bi, hj // blocks_per_group, ci, 0)
  in_specs = [
      pl.BlockSpec((None, r, q, head_dim), head_tile),
      pl.BlockSpec((None, None, q, d_state), group_tile),
      pl.BlockSpec((None, None, q, d_state), group_tile),
      pl.BlockSpec((None, r, None, VEC_ROWS, q), lambda bi, hj, ci: (bi, hj, ci, 0, 0)),
  ]
  args = [x, B, C, vec]
  if d is not None:
    in_specs.append(pl.BlockSpec((r, 1, head_dim), lambda bi, hj, ci: (hj, 0, 0)))
    args.append(d)
  if z is not None:
    in_specs.append(pl.BlockSpec((None, r, q, head_dim), head_tile))
    args.append(z)
  state_tile = pl.BlockSpec((None, r, head_dim, d_state), lambda bi, hj, ci: (bi, hj, 0, 0))
  if initial_states is not None:
    in_specs.append(state_tile)
    args.append(initial_states)
  out_specs = [pl.BlockSpec((None, r, q, head_dim), head_tile)]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, r, None, head_dim, d_state),
                                  lambda bi, hj, ci: (bi, hj, ci, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, chunks, head_dim, d_state),
                                          jnp.float32))
  out_specs.append(state_tile)
  out_shape.append(jax.ShapeDtypeStruct((batch, heads, head_dim, d_state), jnp.float32))

  kernel = functools.partial(_ssd_fwd_kernel, has_d=d is not None, has_z=z is not None,
                             has_init=initial_states is not None, has_seq=has_seq,
                             save_states=save_states)
  outs = pl.pallas_call(
      kernel,
      grid=(batch, heads // r, chunks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((r, head_dim, d_state), jnp.float32)],
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
  )(*args)
  if save_states:
    y, states, final = outs
    return y, final, states
  y, final = outs
  return y, final
