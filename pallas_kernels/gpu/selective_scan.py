"""Mamba-1 selective scan (S6) on the GPU with fused Pallas kernels: the public wrapper and VJP.

``selective_scan_pallas_gpu`` has the semantics of mamba_ssm's ``selective_scan_fn`` (Mamba
§3.2 Algorithm 2, real A) plus varlen resets:

  Δ_t   = softplus(delta_t + delta_bias)                 (bias and softplus optional)
  h_t   = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t             (the decay is 0 where seq_idx changes)
  out_t = (C_t · h_t + D u_t) · silu(z_t)                 (D and z optional)

per channel i of d_inner, reading the B_t, C_t of group i // (d_inner / g). One forward kernel
(``selective_scan_fwd``) and one backward kernel (``selective_scan_bwd``) do all of it, the
softplus and the gate included; they are tied together by ``jax.custom_vjp`` (autodiff does not
go through ``pallas_call``). The backward's residuals are the inputs and the states entering
every chunk of ``block_l`` positions, (b, l / block_l, d, n) float32; the expanded state
(b, l, d, n) is never written to memory.

Backend: Pallas with the Triton lowering (``interpret=True`` runs it on CPU). The Triton backend
is deprecated since JAX 0.11. Opt-in on Hopper: ``backend="mosaic"`` runs the forward in the
Mosaic GPU kernel of ``selective_scan_mgpu`` (its residuals are the Triton forward's) and the
backward in the Mosaic GPU kernel of ``selective_scan_mgpu_bwd``, both tested and timed on an
H100; ``backend="mosaic_fwd"`` pairs that forward with the Triton-lowered backward (a
cross-check: the two backwards are compared result by result in the GPU tests).

Shape legend: b batch, l length, d d_inner, n d_state, g groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import check_args, decay_keep
from pallas_kernels.gpu.selective_scan_bwd import scan_bwd
from pallas_kernels.gpu.selective_scan_fwd import (ScanGpuBlockSizes, default_block_sizes,
                                                   scan_fwd)
from pallas_kernels.gpu.selective_scan_mgpu import check_supported, scan_fwd_mgpu
from pallas_kernels.gpu.selective_scan_mgpu_bwd import (buffer_depths, check_supported_bwd,
                                                        scan_bwd_mgpu, sub_rows)

# The forward kernel of each ``backend``; both return scan_fwd's outputs and residuals.
FORWARDS = {"triton": scan_fwd, "mosaic": scan_fwd_mgpu, "mosaic_fwd": scan_fwd_mgpu}
# The backward kernel of each ``backend``; both take those residuals and return scan_bwd's
# results (dB / dC as partial sums per channel block: block_d channels for Triton, 64 for
# Mosaic GPU), which ``_scan_core_bwd`` reduces the same way.
BACKWARDS = {"triton": scan_bwd, "mosaic": scan_bwd_mgpu, "mosaic_fwd": scan_bwd}


# The Mosaic GPU kernels' default blocks. Measured on an H100 (bf16, d_inner 2048, N 16, 65,536
# tokens; scripts/bench_selective_scan.py, pallas_mosaic@BLOCK_L/SUB_L; kernels of before
# ``selective_scan_mgpu.APPROX_MATH``, whose times are in its docstring), forward+backward ms at
# L = 1K / 4K / 16K: block_l 64 / sub_l 16: 15.9 / 17.0 / 20.3 (the backward's buffers take one
# CTA per SM); 32 / 16: 10.6 / 11.1 / 14.3; 16 / 8: 10.3 / 10.7 / 14.1 (and a forward 5 % slower
# at 16K, saving twice the chunk states). 32 / 16 keeps the saved states at d·n·4 / 32 bytes
# per token (2 KiB at d 2048, N 16 in bf16 against u's 4 KiB).
MOSAIC_BLOCK_L, MOSAIC_SUB_L = 32, 16


def block_sizes(backend: str, d_inner: int, groups: int, batch: int) -> ScanGpuBlockSizes:
  """The default blocks of ``backend``: ``default_block_sizes`` for the Triton kernels, with
  block_l / sub_l = ``MOSAIC_BLOCK_L`` / ``MOSAIC_SUB_L`` for the Mosaic GPU ones."""
  blocks = default_block_sizes(d_inner, groups, batch)
  if backend == "triton":
    return blocks
  return dataclasses.replace(blocks, block_l=MOSAIC_BLOCK_L, sub_l=MOSAIC_SUB_L)


def mosaic_supports(d_inner: int, groups: int, d_state: int, dtype) -> tuple[bool, str]:
  """Whether ``backend="mosaic"`` takes these sizes with its default blocks (forward and
  backward, with z and seq_idx: the largest buffers), and if not, why."""
  try:
    check_supported_bwd(d_inner, groups, d_state, dtype, MOSAIC_BLOCK_L)
    buffer_depths(MOSAIC_BLOCK_L, sub_rows(MOSAIC_BLOCK_L, d_state, MOSAIC_SUB_L), d_state,
                  jnp.dtype(dtype).itemsize, has_z=True, has_keep=True)
  except ValueError as e:
    return False, str(e)
  return True, ""


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def _scan_core(u, delta, a, B, C, d, z, bias, init, keep, length, delta_softplus, blocks,
               interpret, backend):
  y, final = FORWARDS[backend](u, delta, a, B, C, d, z, bias, init, keep, length=length,
                               delta_softplus=delta_softplus, save_states=False,
                               blocks=blocks, interpret=interpret)
  return y, final


def _scan_core_fwd(u, delta, a, B, C, d, z, bias, init, keep, length, delta_softplus, blocks,
                   interpret, backend):
  y, final, states = FORWARDS[backend](u, delta, a, B, C, d, z, bias, init, keep,
                                       length=length, delta_softplus=delta_softplus,
                                       save_states=True, blocks=blocks, interpret=interpret)
  return (y, final), (u, delta, a, B, C, d, z, bias, init, keep, states)


def _scan_core_bwd(length, delta_softplus, blocks, interpret, backend, res, cotangents):
  u, delta, a, B, C, d, z, bias, init, keep, states = res
  dout, dfinal = cotangents
  du, ddelta, dz, db, dc, da, dd, dbias, dinit = BACKWARDS[backend](
      u, delta, a, B, C, d, z, bias, keep, states, dout.astype(u.dtype),
      dfinal.astype(jnp.float32), length=length, delta_softplus=delta_softplus, blocks=blocks,
      interpret=interpret)
  batch, padded_length, groups, d_state = B.shape

  def group_sum(partial, like):  # (b, l, d / channel block, n) -> (b, l, g, n)
    return partial.reshape(batch, padded_length, groups, -1, d_state).sum(3).astype(like.dtype)

  return (du, ddelta, jnp.sum(da, 0), group_sum(db, B), group_sum(dc, C),
          None if d is None else jnp.sum(dd, 0), dz,
          None if bias is None else jnp.sum(dbias, 0), None if init is None else dinit, None)


_scan_core.defvjp(_scan_core_fwd, _scan_core_bwd)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_final_state", "blocks",
                                             "interpret", "backend"))
def selective_scan_pallas_gpu(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                              C: jax.Array, D: jax.Array | None = None,
                              z: jax.Array | None = None, delta_bias: jax.Array | None = None,
                              delta_softplus: bool = False,
                              initial_state: jax.Array | None = None,
                              seq_idx: jax.Array | None = None,
                              return_final_state: bool = False, *,
                              blocks: ScanGpuBlockSizes | None = None,
                              interpret: bool = False, backend: str | None = None):
  """Selective scan (Mamba §3.2 Algorithm 2) forward and backward as fused Pallas GPU kernels.

      Δ_t   = softplus(delta_t + delta_bias)
      h_t   = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t    (decay 0 where seq_idx[t] != seq_idx[t−1])
      out_t = (C_t · h_t + D u_t) · silu(z_t)

  Differentiable in u, delta, A, B, C, D, z, delta_bias and initial_state.

  Args:
    u: (b, l, d) float32 / bfloat16 / float16, any l >= 1 (padded inside to ``block_l``).
    delta: (b, l, d) raw step sizes (float32 / bf16 / fp16).
    A: (d, n) real (used as float32); n a power of two.
    B, C: (b, l, n) or (b, l, g, n); channel i reads group i // (d / g).
    D: optional (d,) skip.
    z: optional (b, l, d) gate.
    delta_bias: optional (d,), added to delta before the softplus.
    delta_softplus: apply softplus to delta + delta_bias.
    initial_state: optional (b, d, n) state before the first token (used as float32).
    seq_idx: optional (b, l) integer segment ids (packed sequences); the decay t−1 → t is zeroed
      where they change, with a virtual seq_idx[−1] = 0.
    return_final_state: also return the state after the last position.
    blocks: block sizes; None picks ``block_sizes(backend, d, g, b)``.
    interpret: run the kernels in the Pallas interpreter (CPU; the Mosaic GPU kernels in
      Mosaic GPU's interpreter).
    backend: the kernels: None or "triton" (the default, Triton lowering); Hopper only,
      opt-in: "mosaic" (the forward ``selective_scan_mgpu.scan_fwd_mgpu`` and the backward
      ``selective_scan_mgpu_bwd.scan_bwd_mgpu``) or "mosaic_fwd" (that forward with the
      Triton-lowered backward).

  Returns:
    out (b, l, d) in u's dtype; with ``return_final_state`` also the final state (b, d, n)
    float32.

  Raises:
    ValueError: on malformed arguments (complex A names the ``impl="chunked"`` fallback),
      blocks that do not tile d_inner / groups, an unknown backend, or sizes the Mosaic GPU
      kernels do not take (naming the ``backend="triton"`` fallback; the backward's limits,
      ``selective_scan_mgpu_bwd.check_supported_bwd`` and its shared-memory budget, are checked
      when the gradient is traced).
  """
  if backend not in (None, *FORWARDS):
    raise ValueError(f"backend={backend!r} must be None, \"triton\", \"mosaic\" or "
                     "\"mosaic_fwd\"")
  backend = backend or "triton"
  dims = check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                    seq_idx, return_final_state)
  batch, length, d_inner, d_state, groups = (dims.batch, dims.length, dims.d_inner,
                                             dims.d_state, dims.groups)
  if blocks is None:
    blocks = block_sizes(backend, d_inner, groups, batch)
  blocks.check(d_inner, groups, d_state)
  if backend in ("mosaic", "mosaic_fwd"):
    check_supported(d_inner, groups, d_state, u.dtype)
  pad = -length % blocks.block_l

  def pad_length(x):
    return None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

  grouped = lambda x: x.reshape(batch, length, groups, d_state)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  keep = decay_keep(seq_idx, batch, length, length + pad)
  y, final = _scan_core(pad_length(u), pad_length(delta), f32(A), pad_length(grouped(B)),
                        pad_length(grouped(C)), f32(D), pad_length(z), f32(delta_bias),
                        f32(initial_state), keep, length, delta_softplus, blocks, interpret,
                        backend)
  y = y[:, :length]
  return (y, final) if return_final_state else y
