"""Mamba-1 selective scan (S6) on TPU with fused Pallas Mosaic kernels: public wrapper and VJP.

``selective_scan_pallas_tpu`` has the semantics of mamba_ssm's ``selective_scan_fn`` (Mamba
§3.2 Algorithm 2, real A) plus varlen resets, and the same argument order as
``pallas_kernels.gpu.selective_scan.selective_scan_pallas_gpu``:

  Δ_t   = softplus(delta_t + delta_bias)                 (bias and softplus optional)
  h_t   = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t             (the decay is 0 where seq_idx changes)
  out_t = (C_t · h_t + D u_t) · silu(z_t)                 (D and z optional)

per channel i of d_inner, reading the B_t, C_t of group i // (d_inner / g).

Kernel layout (prepared here, in XLA, and differentiated by XLA's autodiff): u, delta, z stay
(b, l, d) with channels on lanes; each group's channels are zero-padded to a multiple of 128
(A = 0, B-free: padded channels stay 0) and the length to a multiple of ``block_l`` (the kernels
set Δ = 0 there: decay 1, input 0); both paddings copy the inputs only when the sizes are not
already multiples. A, D, delta_bias and the states are transposed to put channels on lanes
((n, d), (1, d), (b, n, d)); B and C become (b, g, l, n). The two kernels (``selective_scan_fwd``,
``selective_scan_bwd``) are tied by ``jax.custom_vjp``; the residuals are the kernel-layout
inputs and the states entering every chunk, (b, l / block_l, n, d) float32.

TPU speed is unmeasured: no TPU was available. The kernels are tested in the TPU interpreter on
CPU (``interpret=pltpu.InterpretParams()``) and lowered to Mosaic (not compiled) in the tests.

Shape legend: b batch, l length, d d_inner, p = d / g channels per group, n d_state, g groups.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import check_args, decay_keep
from pallas_kernels.tpu.selective_scan_bwd import scan_bwd
from pallas_kernels.tpu.selective_scan_fwd import LANES, ROWS, ScanTpuBlockSizes, scan_fwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _scan_core(u, delta, at, B, C, d, z, bias, init, keep, length, delta_softplus, blocks,
               interpret):
  y, final = scan_fwd(u, delta, at, B, C, d, z, bias, init, keep, length=length,
                      delta_softplus=delta_softplus, save_states=False, blocks=blocks,
                      interpret=interpret)
  return y, final


def _scan_core_fwd(u, delta, at, B, C, d, z, bias, init, keep, length, delta_softplus, blocks,
                   interpret):
  y, final, states = scan_fwd(u, delta, at, B, C, d, z, bias, init, keep, length=length,
                              delta_softplus=delta_softplus, save_states=True, blocks=blocks,
                              interpret=interpret)
  return (y, final), (u, delta, at, B, C, d, z, bias, init, keep, states)


def _scan_core_bwd(length, delta_softplus, blocks, interpret, res, cotangents):
  u, delta, at, B, C, d, z, bias, init, keep, states = res
  dout, dfinal = cotangents
  du, ddelta, dz, db, dc, da, dd, dbias, dinit = scan_bwd(
      u, delta, at, B, C, d, z, bias, keep, states, dout.astype(u.dtype),
      dfinal.astype(jnp.float32), length=length, delta_softplus=delta_softplus, blocks=blocks,
      interpret=interpret)
  batch, groups, padded_length, d_state = B.shape

  def group_sum(partial, like):  # (b, d / block_d, l, n) -> (b, g, l, n)
    return partial.reshape(batch, groups, -1, padded_length, d_state).sum(2).astype(like.dtype)

  return (du, ddelta, jnp.sum(da, 0), group_sum(db, B), group_sum(dc, C),
          None if d is None else jnp.sum(dd, 0), dz,
          None if bias is None else jnp.sum(dbias, 0), None if init is None else dinit, None)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


def default_block_sizes(length: int, d_inner: int, groups: int) -> ScanTpuBlockSizes:
  """block_l = 128 (less for shorter sequences), block_d the largest of 512 / 256 / 128 that
  divides the lane-padded channels of a group."""
  per_group = -(-(d_inner // groups) // LANES) * LANES
  block_d = next(bd for bd in (512, 256, 128) if per_group % bd == 0)
  block_l = min(128, -(-length // ROWS) * ROWS)
  return ScanTpuBlockSizes(block_l=block_l, block_d=block_d)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_final_state", "blocks",
                                             "interpret"))
def selective_scan_pallas_tpu(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                              C: jax.Array, D: jax.Array | None = None,
                              z: jax.Array | None = None, delta_bias: jax.Array | None = None,
                              delta_softplus: bool = False,
                              initial_state: jax.Array | None = None,
                              seq_idx: jax.Array | None = None,
                              return_final_state: bool = False, *,
                              blocks: ScanTpuBlockSizes | None = None, interpret=False):
  """Selective scan (Mamba §3.2 Algorithm 2) forward and backward as fused Pallas TPU kernels.

      Δ_t   = softplus(delta_t + delta_bias)
      h_t   = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t    (decay 0 where seq_idx[t] != seq_idx[t−1])
      out_t = (C_t · h_t + D u_t) · silu(z_t)

  Differentiable in u, delta, A, B, C, D, z, delta_bias and initial_state. TPU speed is
  unmeasured.

  Args:
    u: (b, l, d) float32 / bfloat16 / float16, any l >= 1.
    delta: (b, l, d) raw step sizes (float32 / bf16 / fp16).
    A: (d, n) real (used as float32).
    B, C: (b, l, n) or (b, l, g, n); channel i reads group i // (d / g).
    D: optional (d,) skip.
    z: optional (b, l, d) gate.
    delta_bias: optional (d,), added to delta before the softplus.
    delta_softplus: apply softplus to delta + delta_bias.
    initial_state: optional (b, d, n) state before the first token (used as float32).
    seq_idx: optional (b, l) integer segment ids (packed sequences); the decay t−1 → t is zeroed
      where they change, with a virtual seq_idx[−1] = 0.
    return_final_state: also return the state after the last position.
    blocks: block sizes; None picks ``default_block_sizes``.
    interpret: False (compile with Mosaic), or ``pltpu.InterpretParams(...)`` to run the kernels
      in the TPU interpreter on CPU.

  Returns:
    out (b, l, d) in u's dtype; with ``return_final_state`` also the final state (b, d, n)
    float32.

  Raises:
    ValueError: on malformed arguments (complex A names the ``impl="chunked"`` fallback), blocks
      that do not tile the padded channels, or blocks that do not fit ``vmem_limit_bytes``.
  """
  dims = check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                    seq_idx, return_final_state)
  if interpret is not False and not isinstance(interpret, pltpu.InterpretParams):
    raise ValueError(f"interpret must be False or a pltpu.InterpretParams (TPU semantics), "
                     f"got {interpret!r}")
  b, l, d, n, g = dims.batch, dims.length, dims.d_inner, dims.d_state, dims.groups
  p = d // g
  if blocks is None:
    blocks = default_block_sizes(l, d, g)
  p_pad = -p % LANES
  if (p + p_pad) % blocks.block_d:
    raise ValueError(f"block_d={blocks.block_d} must divide the channels per group padded to "
                     f"a multiple of {LANES}, {p + p_pad} (d_inner={d}, groups={g})")
  itemsize = min(jnp.dtype(x.dtype).itemsize for x in (u, delta, B, C) + ((z,) if z is not None
                                                                          else ()))
  blocks.check(n, itemsize)
  l_pad = -l % blocks.block_l
  f32 = jnp.float32

  def channels(x, lead):  # (*lead, d, *rest) -> (*lead, g (p + p_pad), *rest)
    rest = x.shape[len(lead) + 1:]
    x = x.reshape(*lead, g, p, *rest)
    x = jnp.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, p_pad)] + [(0, 0)] * len(rest))
    return x.reshape(*lead, g * (p + p_pad), *rest)

  def sequence(x):  # (b, l, d) -> (b, l + l_pad, d padded)
    if x is None:
      return None
    return jnp.pad(channels(x, (b, l)), [(0, 0), (0, l_pad), (0, 0)])

  def group_matrix(x):  # (b, l, [g,] n) -> (b, g, l + l_pad, n)
    x = jnp.pad(x.reshape(b, l, g, n), [(0, 0), (0, l_pad), (0, 0), (0, 0)])
    return x.transpose(0, 2, 1, 3)

  def lanes_vector(x):  # (d,) -> (1, d padded) float32
    return None if x is None else channels(x.astype(f32), ()).reshape(1, -1)

  at = channels(A.astype(f32), ()).T
  init = None
  if initial_state is not None:
    init = channels(initial_state.astype(f32), (b,)).transpose(0, 2, 1)
  keep = decay_keep(seq_idx, b, l, l + l_pad)
  if keep is not None:
    keep = keep[..., None]
  y, final = _scan_core(sequence(u), sequence(delta), at, group_matrix(B), group_matrix(C),
                        lanes_vector(D), sequence(z), lanes_vector(delta_bias), init, keep,
                        l, delta_softplus, blocks, interpret)
  y = y[:, :l].reshape(b, l, g, p + p_pad)[..., :p].reshape(b, l, d)
  if not return_final_state:
    return y
  final = final.reshape(b, n, g, p + p_pad)[..., :p].reshape(b, n, d).transpose(0, 2, 1)
  return y, final
