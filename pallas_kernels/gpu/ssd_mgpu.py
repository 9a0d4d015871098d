"""Mamba-2 SSD forward on Hopper with Mosaic GPU (wgmma) kernels, and the backend choice.

``pallas_kernels.gpu.ssd.ssd_pallas_gpu(..., backend="mosaic")`` runs its forward here; the
XLA-side preprocessing (dt bias / softplus / limit, padding to the chunk, the decay vectors of
``ssd._decays``) and the backward (the Triton-lowered kernels of ``ssd_bwd``, through the same
``jax.custom_vjp``) are shared with the Triton backend. The stages (Mamba-2, Dao & Gu 2024,
Sec. 6 / Listing 1):

  chunk_state    S[c] = sum_s exp(cs_last - cs_s) dt_s x_s (outer) B_s    (ssd_mgpu_chunk_state)
  state passing  H[c] = lam[c] H[c-1] + S[c]                               (ssd_mgpu_state_passing)
  chunk_scan     y = (L o C B^T) X + exp(cs) C H[c-1] + D x, gated by z    (ssd_mgpu_chunk_scan)

the chunk state and chunk scan on wgmma, the state passing a float32 register recurrence.

The state passing also writes the states in x's dtype, which the chunk scan's wgmma reads (the
Triton chunk scan rounds them to that dtype too); the float32 ones are the backward's residuals
and the final state.

Supported: x in bfloat16 / float16, head_dim p in {64, 128}, d_state n in {64, 128, 256},
chunk q in {64, 128, 256}, any groups, seq_idx, D per head or channel, z, initial and final
states. float32 inputs are not: wgmma would multiply them in TF32 (10-bit mantissa), which
breaks the float32 tolerance of ~1e-5, so they take the Triton kernels (IEEE float32 products).

Measured on an H100 (bf16, 32 heads x 64, groups 1, N = 128, chunk 256, 65,536 tokens, one
scripts/bench_ssd.py call, docs/results/ssd_h100.json): forward 1.31-1.33 ms at L = 1K..64K
against 1.51-1.71 ms for mamba_ssm's Triton (1.14-1.30x); forward+backward 5.35-5.73 ms against
6.14-6.47 (1.13-1.16x). At N = 64 1.23x / 1.43x; at N = 256 1.00x / 0.75x (the Triton-lowered
backward's tiles). Its kernels at L = 1K: chunk state 0.38 ms, state passing 0.25 ms (0.32 ms
when it also writes every float32 state for the backward), chunk scan 0.76 ms (Triton-lowered
0.98 ms). Tried and dropped: computing C B^T once for the 4 heads of a CTA, each head with
its own accumulator, gave 0.81-0.89 ms against 0.86-0.89 ms for one head per CTA, and the
chunk scan above was faster than either in the same session: the kernel is bound by latency,
not by its matmuls. Next: two consumer warpgroups with the loads in a producer warp, and a
Mosaic GPU backward.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import device_key
from pallas_kernels.gpu.ssd_mgpu_chunk_scan import chunk_scan_fwd_mgpu
from pallas_kernels.gpu.ssd_mgpu_chunk_state import chunk_state_mgpu
from pallas_kernels.gpu.ssd_mgpu_state_passing import state_passing_fwd_mgpu

BACKENDS = ("mosaic", "triton")
HEAD_DIMS = (64, 128)
STATES = (64, 128, 256)
CHUNKS = (64, 128, 256)
# Devices whose default backend is Mosaic GPU: wgmma is Hopper's (sm_90a) instruction.
MOSAIC_DEVICES = ("sm90",)

_log = logging.getLogger(__name__)


def unsupported_reason(dtype, head_dim: int, state: int, chunk_size: int) -> str | None:
  """Why the Mosaic GPU kernels cannot take these inputs, or None when they can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"x dtype {jnp.dtype(dtype)}: the Mosaic GPU kernels take bfloat16 / float16 (wgmma "
            "would round float32 operands to TF32, breaking the float32 tolerance)")
  if head_dim not in HEAD_DIMS:
    return f"head_dim p={head_dim} (the Mosaic GPU kernels take {HEAD_DIMS})"
  if state not in STATES:
    return f"d_state n={state} (the Mosaic GPU kernels take {STATES})"
  if chunk_size not in CHUNKS:
    return f"chunk_size={chunk_size} (the Mosaic GPU kernels take {CHUNKS})"
  return None


def resolve_backend(backend: str | None, dtype, head_dim: int, state: int, chunk_size: int,
                    interpret: bool) -> str:
  """The backend to run: ``backend`` itself (checked), or for None "mosaic" on Hopper when the
  inputs are supported, else "triton" (logged)."""
  if backend is None:
    where = "cpu" if interpret else device_key()
    reason = unsupported_reason(dtype, head_dim, state, chunk_size)
    if where in MOSAIC_DEVICES and reason is None:
      return "mosaic"
    _log.info("ssd_pallas_gpu: Triton-lowered kernels (%s)",
              f"device {where}" if where not in MOSAIC_DEVICES else reason)
    return "triton"
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} must be one of {BACKENDS} or None (auto)")
  if backend == "mosaic":
    reason = unsupported_reason(dtype, head_dim, state, chunk_size)
    if reason is not None:
      raise ValueError(f"backend='mosaic' does not support {reason}; use backend='triton'")
  return backend


def forward_mgpu(x, b, c, dt, cs, dte, w_off, lam, d, z, init, seq_idx, *, chunk_size: int,
                 keep_all: bool, interpret: bool):
  """The SSD forward from preprocessed inputs (as ``ssd._forward``): (y, states).

  Args:
    x: (b, l, h, p) bf16/f16, l a multiple of ``chunk_size``; b, c: (b, l, g, n) in x's dtype.
    dt, cs, dte, w_off: (b, h, l) float32 processed steps and ``ssd._decays``' vectors.
    lam: (b, h, c) float32 chunk-end decays.
    d: (h, p) float32 or None; z: (b, l, h, p) or None; init: (b, h, p, n) float32 or None.
    seq_idx: (b, l) int32 or None.
    chunk_size: q; interpret: run in Mosaic GPU's interpreter (CPU).
    keep_all: return every chunk-boundary state (the backward's residuals) rather than only
      the final one; a forward alone skips writing the others in float32.

  Returns:
    y (b, l, h, p) in x's dtype, and with ``keep_all`` all_states (b, c + 1, h, p, n) float32
    (index 0 the initial state, index c + 1 the state leaving chunk c), else the final state
    (b, h, p, n) float32.
  """
  batch, length, heads, head_dim = x.shape
  state = b.shape[-1]
  chunks = length // chunk_size
  states = chunk_state_mgpu(x, b, dte * dt, chunk_size=chunk_size, interpret=interpret)
  flat_init = None if init is None else init.reshape(batch, heads, head_dim * state)
  kept, low = state_passing_fwd_mgpu(
      states.reshape(batch, chunks, heads, head_dim * state), lam, flat_init,
      low_dtype=x.dtype, keep_all=keep_all, interpret=interpret)
  y = chunk_scan_fwd_mgpu(x, b, c, dt, cs, w_off,
                          low.reshape(batch, chunks, heads, head_dim, state), d, z, seq_idx,
                          chunk_size=chunk_size, interpret=interpret)
  kept_shape = (batch, chunks + 1) if keep_all else (batch,)
  return y, kept.reshape(*kept_shape, heads, head_dim, state)
