"""Mamba-2 SSD on the GPU with Pallas kernels: the public wrapper and its custom VJP.

``ssd_pallas_gpu`` has the semantics of mamba_ssm's ``mamba_chunk_scan_combined`` (Mamba-2,
Dao & Gu 2024, Sec. 6): per head i (group g = i // (h // g)), with
dt = clip(softplus(dt + dt_bias), *dt_limit),

  h_t = exp(dt_t A) h_{t-1} + dt_t x_t (outer) B_t,   y_t = h_t C_t + D x_t,   out = y * silu(z),

the decay t-1 -> t zeroed where ``seq_idx`` changes (a virtual seq_idx[-1] = 0 at t = 0).

Pipeline (every stage a Pallas kernel with the Triton lowering, except the per-position
prologue, one small XLA fusion over (b, h, l) float32 vectors):

  prologue      dt processing, cs = within-chunk cumsum(dt A), chunk-end / entering decays
  chunk_state   S[c] = sum_s exp(cs_last - cs_s) dt_s x_s (outer) B_s       (ssd_chunk_state)
  state passing H[c] = lam[c] H[c-1] + S[c], sequential over chunks           (ssd_state_passing)
  chunk_scan    y = (L o C B^T) X + exp(cs) C H[c-1] + D x, gated by z       (ssd_chunk_scan)

``backend="mosaic"`` (the default on Hopper for bfloat16 / float16 inputs) runs the forward's
chunk state, state passing and chunk scan as Mosaic GPU (wgmma) kernels instead, from the same
prologue (``ssd_mgpu``); the backward below is the same for both backends.

The backward (a ``jax.custom_vjp``) saves only the inputs and the chunk-boundary states, and
recomputes the rest: the gate backward re-runs the chunk scan (when z is given), dprev reuses the
chunk-state kernel, the state passing runs in reverse, and ``ssd_bwd`` computes dx / dB / dC /
ddt / dD (by default dB / dC through ``ssd_bwd_shared_w``; ``bwd="per_head"``: ``ssd_bwd``'s
per-head dB and dC kernels); the decay
gradient dcs is reverse-cumsummed into ddt and dA in XLA.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from pallas_kernels.gpu import ssd_bwd, ssd_bwd_shared_w, ssd_mgpu
from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes, tuned_block_sizes
from pallas_kernels.gpu.ssd_chunk_scan import chunk_scan_fwd, chunk_scan_gate_bwd
from pallas_kernels.gpu.ssd_chunk_state import chunk_state
from pallas_kernels.gpu.ssd_state_passing import state_passing_bwd, state_passing_fwd


def _decays(dt, a, seq_idx, chunk_size):
  """Per-position decay vectors from processed dt (b, h, l) float32 and A (h,) float32.

  Returns cs (b, h, l): within-chunk cumsum of dt A; dte (b, h, l): exp(cs_last - cs_s), zero
  where s's sequence is not the chunk end's; w_off (b, h, l): exp(cs_t), zero where t's
  sequence is not the one ending the previous chunk; lam (b, h, c): exp(cs_last), zero where
  the chunk-end sequence differs from the previous chunk end's.
  """
  batch, heads, length = dt.shape
  chunks = length // chunk_size
  cs = jnp.cumsum((dt * a[None, :, None]).reshape(batch, heads, chunks, chunk_size), axis=-1)
  cs_last = cs[..., -1]
  dte = jnp.exp(cs_last[..., None] - cs)
  w_off = jnp.exp(cs)
  lam = jnp.exp(cs_last)
  if seq_idx is not None:
    seq = seq_idx.reshape(batch, 1, chunks, chunk_size)
    seq_end = seq[..., -1]
    seq_before = jnp.concatenate([jnp.zeros_like(seq_end[..., :1]), seq_end[..., :-1]], -1)
    dte = jnp.where(seq == seq_end[..., None], dte, 0.0)
    w_off = jnp.where(seq == seq_before[..., None], w_off, 0.0)
    lam = jnp.where(seq_end == seq_before, lam, 0.0)
  flat = lambda v: v.reshape(batch, heads, length)
  return flat(cs), flat(dte), flat(w_off), lam


def _forward(x, dt, a, b, c, d, z, init, seq_idx, chunk_size, blocks, interpret, backend,
             keep_all):
  """(y, all_states (b, c + 1, h, p, n) float32), or with ``keep_all=False`` (y, the final
  state (b, h, p, n)): a forward alone need not keep the other chunk-boundary states."""
  batch, length, heads, head_dim = x.shape
  state = b.shape[-1]
  chunks = length // chunk_size
  cs, dte, w_off, lam = _decays(dt, a, seq_idx, chunk_size)
  if backend == "mosaic":
    return ssd_mgpu.forward_mgpu(x, b, c, dt, cs, dte, w_off, lam, d, z, init, seq_idx,
                                 chunk_size=chunk_size, keep_all=keep_all,
                                 interpret=interpret)
  states = chunk_state(x, b, dte * dt, chunk_size=chunk_size, blocks=blocks,
                       interpret=interpret)
  if init is None:
    init = jnp.zeros((batch, heads, head_dim, state), jnp.float32)
  all_states = state_passing_fwd(
      states.reshape(batch, chunks, heads, head_dim * state), lam,
      init.reshape(batch, heads, head_dim * state), blocks=blocks, interpret=interpret,
  ).reshape(batch, chunks + 1, heads, head_dim, state)
  y = chunk_scan_fwd(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx,
                     chunk_size=chunk_size, blocks=blocks, interpret=interpret)
  return y, (all_states if keep_all else all_states[:, -1])


def _heads_major(dtp: jax.Array) -> jax.Array:
  """The processed steps (b, l, h) -> (b, h, l), the kernels' layout, as a real transpose.

  Both sides are pinned row-major (``with_layout_constraint``; the constraint also holds for
  the cotangent). Left free, XLA's layout assignment makes this small transpose a bitcast by
  giving dt a length-minor layout, and that layout spreads through in_proj's output slices to
  the conv, the gate and the gated norm: every (b, l, channels) array around the kernels was
  then transposed on its way in and out. Measured on an H100 (one Mamba-2 130M mixer, batch
  16 × 2,048 tokens, bf16, forward + backward): 19 transpose kernels writing 2.4 GiB and
  6.93 ms, against 2 transposes (6 MiB) and 5.51 ms with the pins.
  """
  row_major = lambda v: with_layout_constraint(v, Layout(major_to_minor=tuple(range(v.ndim))))
  return row_major(jnp.transpose(row_major(dtp), (0, 2, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13))
def _ssd_core(x, dt, a, b, c, d, z, init, seq_idx, chunk_size, blocks, interpret, backend,
              bwd):
  del bwd
  return _forward(x, dt, a, b, c, d, z, init, seq_idx, chunk_size, blocks, interpret, backend,
                  keep_all=False)


def _ssd_core_fwd(x, dt, a, b, c, d, z, init, seq_idx, chunk_size, blocks, interpret, backend,
                  bwd):
  del bwd
  y, all_states = _forward(x, dt, a, b, c, d, z, init, seq_idx, chunk_size, blocks, interpret,
                           backend, keep_all=True)
  return (y, all_states[:, -1]), (x, dt, a, b, c, d, z, init, seq_idx, all_states)


def _ssd_core_bwd(chunk_size, blocks, interpret, backend, bwd, res, cotangents):
  del backend  # both forwards share the Triton-lowered backward kernels
  x, dt, a, b, c, d, z, init, seq_idx, all_states = res
  dout, dfinal = cotangents
  batch, length, heads, head_dim = x.shape
  state = b.shape[-1]
  chunks = length // chunk_size
  pn = head_dim * state
  kw = dict(chunk_size=chunk_size, blocks=blocks, interpret=interpret)
  cs, dte, w_off, lam = _decays(dt, a, seq_idx, chunk_size)
  if z is not None:
    dy, dz = chunk_scan_gate_bwd(x, b, c, dt, cs, w_off, all_states, d, z, seq_idx,
                                 dout.astype(x.dtype), **kw)
  else:
    dy, dz = dout.astype(x.dtype), None
  dprev = chunk_state(dy, c, w_off, **kw)
  dstates, dcs_last, dinit = state_passing_bwd(
      dprev.reshape(batch, chunks, heads, pn),
      all_states.reshape(batch, chunks + 1, heads, pn), lam,
      dfinal.astype(jnp.float32).reshape(batch, heads, pn),
      blocks=blocks, interpret=interpret)
  dstates = dstates.reshape(batch, chunks, heads, head_dim, state)
  dx, ddt, dd = ssd_bwd.ssd_bwd_dx(x, dy, b, c, dt, cs, dte, dstates, d, seq_idx, **kw)
  if bwd == "shared_w":
    db, w, r_b, r_c = ssd_bwd_shared_w.ssd_bwd_w(x, dy, b, c, dt, cs, dte, dstates, seq_idx,
                                                 **kw)
    dc, r_c_state = ssd_bwd_shared_w.ssd_bwd_dc_from_w(dy, b, c, w, w_off, all_states, **kw)
    r_c = r_c + r_c_state
  else:
    db, r_b = ssd_bwd.ssd_bwd_db(x, dy, b, c, dt, cs, dte, dstates, seq_idx, **kw)
    dc, r_c = ssd_bwd.ssd_bwd_dc(x, dy, b, c, dt, cs, w_off, all_states, seq_idx, **kw)
  dcs = (r_c - r_b).reshape(batch, heads, chunks, chunk_size)
  dcs = dcs.at[..., -1].add(dcs_last)
  da = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1).reshape(batch, heads, length)
  ddt = ddt + da * a[None, :, None]
  dA = jnp.sum(da * dt, axis=(0, 2))
  return (dx, ddt, dA, db, dc, None if d is None else dd, dz,
          None if init is None else dinit.reshape(init.shape), None)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def _check_args(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
  if x.ndim != 4:
    raise ValueError(f"x must have shape (b, l, h, p), got shape {x.shape}")
  batch, length, heads, head_dim = x.shape
  if B.ndim != 4 or B.shape[:2] != (batch, length) or heads % B.shape[2]:
    raise ValueError(f"B must have shape (b, l, g, n) = ({batch}, {length}, g | {heads}, n), "
                     f"got shape {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"C must have B's shape {B.shape}, got shape {C.shape}")
  if B.dtype != x.dtype or C.dtype != x.dtype:
    raise ValueError(f"B and C must have x's dtype {x.dtype}, got {B.dtype} and {C.dtype}")
  if dt.shape != (batch, length, heads):
    raise ValueError(f"dt must have shape (b, l, h) = {(batch, length, heads)}, "
                     f"got shape {dt.shape}")
  if A.shape != (heads,):
    raise ValueError(f"A must have shape (h,) = ({heads},), got shape {A.shape}")
  if D is not None and D.shape not in ((heads,), (heads, head_dim)):
    raise ValueError(f"D must have shape (h,) or (h, p) = ({heads}, {head_dim}), "
                     f"got shape {D.shape}")
  if z is not None and (z.shape != x.shape or z.dtype != x.dtype):
    raise ValueError(f"z must have x's shape {x.shape} and dtype {x.dtype}, "
                     f"got {z.shape} {z.dtype}")
  if dt_bias is not None and dt_bias.shape != (heads,):
    raise ValueError(f"dt_bias must have shape (h,) = ({heads},), got shape {dt_bias.shape}")
  state = B.shape[-1]
  if initial_states is not None and initial_states.shape != (batch, heads, head_dim, state):
    raise ValueError(f"initial_states must have shape (b, h, p, n) = "
                     f"{(batch, heads, head_dim, state)}, got shape {initial_states.shape}")
  if seq_idx is not None and (seq_idx.shape != (batch, length)
                              or not jnp.issubdtype(seq_idx.dtype, jnp.integer)):
    raise ValueError(f"seq_idx must be an integer array of shape (b, l) = {(batch, length)}, "
                     f"got {seq_idx.shape} {seq_idx.dtype}")


@functools.partial(jax.jit, static_argnames=(
    "chunk_size", "dt_softplus", "dt_limit", "return_final_states", "blocks", "interpret",
    "backend", "bwd"))
def ssd_pallas_gpu(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None,
                   dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
                   initial_states=None, seq_idx=None, return_final_states: bool = False, *,
                   blocks: SSDBlockSizes | None = None, interpret: bool = False,
                   backend: str | None = None, bwd: str = "shared_w"):
  """Mamba-2 SSD (Dao & Gu 2024, Sec. 6), forward and backward as Pallas GPU kernels.

  Args:
    x: (b, l, h, p) float32 / bfloat16 / float16. Any l (padded to the chunk with dt = 0).
    dt: (b, l, h) raw steps (any float dtype; processed in float32).
    A: (h,) negative decay rates (float32).
    B, C: (b, l, g, n) in x's dtype; head i reads group i // (h // g).
    chunk_size: q, a power of two >= 16.
    D: (h,) or (h, p) skip weights, or None.
    z: (b, l, h, p) gate in x's dtype, or None.
    dt_bias: (h,), or None.
    dt_softplus: apply softplus to dt + dt_bias.
    dt_limit: clip range of the processed dt; (0, inf) means no clipping.
    initial_states: (b, h, p, n), or None (zeros).
    seq_idx: (b, l) int, nondecreasing sequence ids, or None.
    return_final_states: also return the (b, h, p, n) float32 final states.
    blocks: tile sizes; None picks the tuned table's entry for this device.
    interpret: run every kernel in the Pallas interpreter (CPU).
    backend: the forward's kernels: "mosaic" (Mosaic GPU wgmma kernels for Hopper,
      ``ssd_mgpu``; bfloat16 / float16 only, else a ValueError naming "triton"), "triton" (the
      Triton-lowered kernels), or None: "mosaic" on an sm90 GPU when it supports the inputs,
      else "triton". The backward is the Triton-lowered kernels' either way.
    bwd: the backward's dB / dC kernels: "shared_w" (``ssd_bwd_shared_w``: W, summed over a
      group's heads, then one (q, q) x (q, n) product per group) or "per_head" (``ssd_bwd``:
      dB and dC kernels with those products per head). On an H100 (65,536 tokens at 4K, 32
      heads, N = 128, bf16, Mosaic forward): forward + backward 4.30 ms against 5.31 (N = 256:
      8.59 against 12.0).

  Returns:
    out (b, l, h, p) in x's dtype, and the final states when ``return_final_states``.
  """
  _check_args(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
  batch, length, heads, head_dim = x.shape
  state = B.shape[-1]
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"{chunk_size=} must be a power of two >= 16")
  if blocks is None:
    blocks = tuned_block_sizes(head_dim, state, chunk_size)
  blocks.check(chunk_size, head_dim, state)
  backend = ssd_mgpu.resolve_backend(backend, x.dtype, head_dim, state, chunk_size, interpret)
  if (head_dim * state) % blocks.block_pn:
    raise ValueError(f"p*n={head_dim * state} must be a multiple of block_pn={blocks.block_pn}")

  dtp = dt.astype(jnp.float32)
  if dt_bias is not None:
    dtp = dtp + dt_bias.astype(jnp.float32)[None, None, :]
  if dt_softplus:
    dtp = jax.nn.softplus(dtp)
  if tuple(dt_limit) != (0.0, math.inf):
    dtp = jnp.clip(dtp, dt_limit[0], dt_limit[1])
  pad = -length % chunk_size
  if pad:
    zero_pad = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    x, B, C, dtp = map(zero_pad, (x, B, C, dtp))
    z = None if z is None else zero_pad(z)
    if seq_idx is not None:
      seq_idx = jnp.pad(seq_idx, [(0, 0), (0, pad)], mode="edge")
  dtp = _heads_major(dtp)
  d = None
  if D is not None:
    d = jnp.broadcast_to(D.astype(jnp.float32).reshape(heads, -1), (heads, head_dim))
  init = None if initial_states is None else initial_states.astype(jnp.float32)
  seq = None if seq_idx is None else seq_idx.astype(jnp.int32)
  if bwd not in ("per_head", "shared_w"):
    raise ValueError(f"bwd={bwd!r} must be 'per_head' or 'shared_w'")
  out, final = _ssd_core(x, dtp, A.astype(jnp.float32), B, C, d, z, init, seq,
                         chunk_size, blocks, interpret, backend, bwd)
  out = out[:, :length]
  return (out, final) if return_final_states else out
