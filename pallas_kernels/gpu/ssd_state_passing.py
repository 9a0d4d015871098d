"""SSD state passing across chunks (forward and its reverse), Pallas GPU kernels.

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, step 3 ("inter-chunk recurrence"): with the
chunk-end decay lam[c] = exp(cs_last[c]) (zero where seq_idx changes between chunk ends),

  H[-1] = initial state,   H[c] = lam[c] * H[c - 1] + S[c],

a short sequential loop over the c chunks, parallel over batch, heads and tiles of the flattened
(p n) state. The backward runs the same recurrence in reverse:

  dH[c - 1] = dprev[c] + lam[c] * dH[c],   dS[c] = dH[c],
  dcs_last[c] = <dH[c], H[c]>   (d/dcs_last of both lam[c] H[c-1] and S[c], whose terms all
                                 carry exp(cs_last)),

starting from dH[C - 1] = d final state; d initial state = dH[-1].

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. All float32.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes


def _check(states: jax.Array, lam: jax.Array, block_pn: int) -> tuple[int, int, int, int]:
  batch, chunks, heads, pn = states.shape
  if states.dtype != jnp.float32:
    raise ValueError(f"states must be float32, got {states.dtype}")
  if lam.shape != (batch, heads, chunks) or lam.dtype != jnp.float32:
    raise ValueError(f"lam has shape {lam.shape} dtype {lam.dtype}; expected "
                     f"({batch}, {heads}, {chunks}) float32")
  if pn % block_pn:
    raise ValueError(f"p*n={pn} must be a multiple of {block_pn=}")
  return batch, chunks, heads, pn


def _forward_kernel(states_ref, lam_ref, init_ref, all_ref, *, chunks: int):
  """states_ref (c, bpn), lam_ref (c,), init_ref (bpn,) -> all_ref (c + 1, bpn)."""
  h0 = init_ref[...]
  all_ref[0, :] = h0

  def body(c, h):
    h = lam_ref[c] * h + states_ref[c, :]
    all_ref[c + 1, :] = h
    return h

  lax.fori_loop(0, chunks, body, h0)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def state_passing_fwd(states: jax.Array, lam: jax.Array, init: jax.Array, *,
                      blocks: SSDBlockSizes, interpret: bool = False) -> jax.Array:
  """Chunk-boundary states H[-1..c-1], Mamba-2 Sec. 6 step 3.

  Args:
    states: (b, c, h, p*n) float32 per-chunk states S[c].
    lam: (b, h, c) float32 chunk-end decays.
    init: (b, h, p*n) float32 initial states H[-1].
    blocks: ``block_pn`` tiles p*n.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (b, c + 1, h, p*n) float32: index 0 is H[-1] (the state entering chunk 0), index c + 1 is
    H[c] (leaving chunk c); the last is the final state.
  """
  batch, chunks, heads, pn = _check(states, lam, blocks.block_pn)
  if init.shape != (batch, heads, pn) or init.dtype != jnp.float32:
    raise ValueError(f"init has shape {init.shape} dtype {init.dtype}; expected "
                     f"({batch}, {heads}, {pn}) float32")
  bpn = blocks.block_pn
  return pl.pallas_call(
      functools.partial(_forward_kernel, chunks=chunks),
      grid=(pn // bpn, heads, batch),
      in_specs=[
          pl.BlockSpec((None, chunks, None, bpn), lambda j, h, b: (b, 0, h, j)),
          pl.BlockSpec((None, None, chunks), lambda j, h, b: (b, h, 0)),
          pl.BlockSpec((None, None, bpn), lambda j, h, b: (b, h, j)),
      ],
      out_specs=pl.BlockSpec((None, chunks + 1, None, bpn), lambda j, h, b: (b, 0, h, j)),
      out_shape=jax.ShapeDtypeStruct((batch, chunks + 1, heads, pn), jnp.float32),
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="ssd_state_passing_fwd",
  )(states, lam, init)


def _backward_kernel(dprev_ref, all_ref, lam_ref, dfinal_ref, dstates_ref, dcs_ref, dinit_ref,
                     *, chunks: int):
  """dprev_ref (c, bpn), all_ref (c + 1, bpn), lam_ref (c,), dfinal_ref (bpn,) ->
  dstates_ref (c, bpn), dcs_ref (c,) partial sums over this tile, dinit_ref (bpn,)."""

  def body(i, dh):
    c = chunks - 1 - i
    dstates_ref[c, :] = dh
    dcs_ref[c] = jnp.sum(dh * all_ref[c + 1, :])
    return dprev_ref[c, :] + lam_ref[c] * dh

  dinit_ref[...] = lax.fori_loop(0, chunks, body, dfinal_ref[...])


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def state_passing_bwd(dprev: jax.Array, all_states: jax.Array, lam: jax.Array,
                      dfinal: jax.Array, *, blocks: SSDBlockSizes, interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reverse of ``state_passing_fwd``.

  Args:
    dprev: (b, c, h, p*n) float32 gradient of the state entering each chunk (from the outputs).
    all_states: (b, c + 1, h, p*n) float32, ``state_passing_fwd``'s result.
    lam: (b, h, c) float32 chunk-end decays.
    dfinal: (b, h, p*n) float32 gradient of the final state.
    blocks: ``block_pn`` tiles p*n.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    dstates (b, c, h, p*n) float32 (gradient of each chunk's own state S[c]), dcs_last
    (b, h, c) float32 (gradient of each chunk's last cumulative log-decay), dinit (b, h, p*n).
  """
  batch, chunks, heads, pn = _check(dprev, lam, blocks.block_pn)
  if all_states.shape != (batch, chunks + 1, heads, pn):
    raise ValueError(f"all_states has shape {all_states.shape}; expected "
                     f"({batch}, {chunks + 1}, {heads}, {pn})")
  bpn = blocks.block_pn
  tiles = pn // bpn
  dstates, dcs, dinit = pl.pallas_call(
      functools.partial(_backward_kernel, chunks=chunks),
      grid=(tiles, heads, batch),
      in_specs=[
          pl.BlockSpec((None, chunks, None, bpn), lambda j, h, b: (b, 0, h, j)),
          pl.BlockSpec((None, chunks + 1, None, bpn), lambda j, h, b: (b, 0, h, j)),
          pl.BlockSpec((None, None, chunks), lambda j, h, b: (b, h, 0)),
          pl.BlockSpec((None, None, bpn), lambda j, h, b: (b, h, j)),
      ],
      out_specs=[
          pl.BlockSpec((None, chunks, None, bpn), lambda j, h, b: (b, 0, h, j)),
          pl.BlockSpec((None, None, None, chunks), lambda j, h, b: (b, h, j, 0)),
          pl.BlockSpec((None, None, bpn), lambda j, h, b: (b, h, j)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, chunks, heads, pn), jnp.float32),
          jax.ShapeDtypeStruct((batch, heads, tiles, chunks), jnp.float32),
          jax.ShapeDtypeStruct((batch, heads, pn), jnp.float32),
      ],
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="ssd_state_passing_bwd",
  )(dprev, all_states, lam, dfinal)
  return dstates, jnp.sum(dcs, axis=2), dinit
