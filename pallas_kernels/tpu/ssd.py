"""Mamba-2 SSD on TPU with Pallas Mosaic kernels: the public wrapper and its custom VJP.

``ssd_pallas_tpu`` has the semantics of mamba_ssm's ``mamba_chunk_scan_combined`` (Mamba-2,
Dao & Gu 2024, §6 and §7.1): per head i (group i // (h // g)),

  dt = clip(softplus(dt + dt_bias), *dt_limit)
  h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,   y_t = h_t C_t + D x_t,   out = y · silu(z),

the decay t-1 → t zeroed where ``seq_idx`` changes (a virtual seq_idx[-1] = 0 at t = 0).

Split of the work:
  prologue (XLA)  dt processing and the per-position float32 vectors of every chunk: cs (the
                  within-chunk cumsum of dt·A), dt, w_in = exp(cs_t), w_out = exp(cs_last - cs_s)
                  dt_s, masked by seq_idx; O(b·l·h), 1/p of x's traffic.
  ``ssd_fwd``     the chunk loop: diagonal blocks, state read-out, D, z and state passing in
                  one kernel (the state lives in VMEM).
  ``ssd_bwd``     the same loop in reverse carrying dh, recomputing each chunk from its saved
                  entering state.
The kernels are differentiated by hand (``jax.custom_vjp`` on ``_ssd_core``) with respect to
their direct inputs (x, B, C, the vectors, D, z, initial states); XLA's autodiff carries the
vectors' gradients back through the prologue to dt, A and dt_bias (the reverse cumsum of the
decay gradient, softplus, clip), so that part needs no hand-written backward.

Residuals of the backward: the kernel-layout inputs and the chunk-entering states
(b, h, c, p, n) float32, nothing of size (b, l, h, p) beyond the inputs.

TPU speed is unmeasured: no TPU was available. The kernels are tested in the TPU interpreter on
CPU (``interpret=pltpu.InterpretParams()``) and lowered to Mosaic (not compiled) in the tests.

Shape legend: b batch, l length, c chunks, q chunk size, h heads, g groups, p head_dim,
n d_state.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.tpu.ssd_blocks import DVEC_ROWS, SSDTpuBlockSizes, default_block_sizes
from pallas_kernels.tpu.ssd_bwd import ssd_bwd
from pallas_kernels.tpu.ssd_fwd import ssd_fwd

NO_DT_LIMIT = (0.0, math.inf)
_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _process_dt(dt, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]) -> jax.Array:
  """dt ← clip(softplus(dt + dt_bias), *dt_limit) in float32 (Mamba-2 §7.1), (b, l, h)."""
  dt = dt.astype(jnp.float32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(jnp.float32)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  if tuple(dt_limit) != NO_DT_LIMIT:
    dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
  return dt


def _position_vectors(dt: jax.Array, A: jax.Array, seq: jax.Array | None) -> jax.Array:
  """The kernels' per-position rows (cs, dt, w_in, w_out, seg), (b, h, c, 5, q) float32.

  With a = dt·A per position of a chunk (Mamba-2 §6, "chunk cumsum"):
    cs[t]    = a[0] + ... + a[t]
    w_in[t]  = exp(cs[t]) if seq[t] == id of the state entering the chunk, else 0
    w_out[s] = exp(a[s+1] + ... + a[q-1]) dt[s] if seq[s] == seq[q-1], else 0
    seg[t]   = seq[t] - seq[0], the chunk-local segment id (exact in float32: < q)
  The entering state's id is seq at the previous chunk's end (a virtual 0 before chunk 0).

  Args:
    dt: (b, h, c, q) processed float32 steps (0 in the padding).
    A: (h,) float32.
    seq: optional (b, c, q) int32 ids (edge-padded).
  """
  a = dt * A[None, :, None, None]
  cs = jnp.cumsum(a, axis=-1)
  after = jnp.concatenate([a[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)
  to_end = jnp.flip(jnp.cumsum(jnp.flip(after, -1), axis=-1), -1)
  w_in = jnp.exp(cs)
  w_out = jnp.exp(to_end) * dt
  if seq is None:
    seg = jnp.zeros_like(cs)
  else:
    last = seq[..., -1]  # (b, c)
    entering = jnp.concatenate([jnp.zeros_like(last[:, :1]), last[:, :-1]], axis=1)
    w_in = jnp.where((seq == entering[..., None])[:, None], w_in, 0.0)
    w_out = jnp.where((seq == last[..., None])[:, None], w_out, 0.0)
    seg = jnp.broadcast_to((seq - seq[..., :1]).astype(jnp.float32)[:, None], cs.shape)
  return jnp.stack([cs, dt, w_in, w_out, seg], axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ssd_core(x, B, C, vec, d, z, init, blocks, has_seq, interpret):
  y, final = ssd_fwd(x, B, C, vec, d, z, init, blocks=blocks, has_seq=has_seq,
                     save_states=False, interpret=interpret)
  return y, final


def _ssd_core_fwd(x, B, C, vec, d, z, init, blocks, has_seq, interpret):
  y, final, states = ssd_fwd(x, B, C, vec, d, z, init, blocks=blocks, has_seq=has_seq,
                             save_states=True, interpret=interpret)
  return (y, final), (x, B, C, vec, d, z, init, states)


def _ssd_core_bwd(blocks, has_seq, interpret, res, cotangents):
  x, B, C, vec, d, z, init, states = res
  dy, dfinal = cotangents
  dx, dB, dC, dvec, dd, dz, dinit = ssd_bwd(
      x, B, C, vec, d, z, states, dy.astype(x.dtype), dfinal.astype(jnp.float32),
      blocks=blocks, has_seq=has_seq, has_init=init is not None, interpret=interpret)
  pad_rows = vec.shape[-2] - DVEC_ROWS  # seg has no gradient
  dvec = jnp.pad(dvec, [(0, 0)] * 3 + [(0, pad_rows), (0, 0)])
  return (dx, dB.astype(B.dtype), dC.astype(C.dtype), dvec, dd, dz,
          None if init is None else dinit)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx):
  """Raises ValueError naming the first malformed argument."""
  if x.ndim != 4:
    raise ValueError(f"x must have shape (batch, length, heads, head_dim), got {x.shape}")
  if x.dtype not in _INPUT_DTYPES:
    raise ValueError(f"x must be float32, bfloat16 or float16 (TPU kernels have no float64), "
                     f"got {x.dtype}")
  b, l, h, p = x.shape
  if dt.shape != (b, l, h) or not jnp.issubdtype(dt.dtype, jnp.floating):
    raise ValueError(f"dt must be floating with shape (batch, length, heads) = {(b, l, h)}, "
                     f"got {dt.shape} {dt.dtype}")
  if B.ndim != 4 or B.shape[:2] != (b, l) or B.shape[2] == 0 or h % B.shape[2]:
    raise ValueError(f"B must have shape (batch, length, groups, d_state) = ({b}, {l}, g, n) "
                     f"with g dividing heads={h}, got {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"C must have B's shape {B.shape}, got {C.shape}")
  if B.dtype != x.dtype or C.dtype != x.dtype:
    raise ValueError(f"B and C must have x's dtype {x.dtype}, got {B.dtype} and {C.dtype}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 \
      or chunk_size % 16:
    raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")
  if A.shape != (h,) or not jnp.issubdtype(A.dtype, jnp.floating):
    raise ValueError(f"A must be floating with shape (heads,) = ({h},), got {A.shape} {A.dtype}")
  if D is not None and (D.shape not in ((h,), (h, p))
                        or not jnp.issubdtype(D.dtype, jnp.floating)):
    raise ValueError(f"D must be floating with shape (heads,) = ({h},) or (heads, head_dim) = "
                     f"{(h, p)}, got {D.shape} {D.dtype}")
  if z is not None and (z.shape != x.shape or z.dtype != x.dtype):
    raise ValueError(f"z must have x's shape {x.shape} and dtype {x.dtype}, "
                     f"got {z.shape} {z.dtype}")
  if dt_bias is not None and (dt_bias.shape != (h,)
                              or not jnp.issubdtype(dt_bias.dtype, jnp.floating)):
    raise ValueError(f"dt_bias must be floating with shape (heads,) = ({h},), "
                     f"got {dt_bias.shape} {dt_bias.dtype}")
  if len(dt_limit) != 2 or not 0.0 <= dt_limit[0] <= dt_limit[1]:
    raise ValueError(f"dt_limit must be (min, max) with 0 <= min <= max, got {dt_limit!r}")
  n = B.shape[3]
  if initial_states is not None and (
      initial_states.shape != (b, h, p, n)
      or not jnp.issubdtype(initial_states.dtype, jnp.floating)):
    raise ValueError(f"initial_states must be floating with shape (batch, heads, head_dim, "
                     f"d_state) = {(b, h, p, n)}, got {initial_states.shape} "
                     f"{initial_states.dtype}")
  if seq_idx is not None and (seq_idx.shape != (b, l)
                              or not jnp.issubdtype(seq_idx.dtype, jnp.integer)):
    raise ValueError(f"seq_idx must be integer with shape (batch, length) = {(b, l)}, "
                     f"got {seq_idx.shape} {seq_idx.dtype}")


@functools.partial(jax.jit, static_argnames=(
    "chunk_size", "dt_softplus", "dt_limit", "return_final_states", "blocks", "interpret"))
def ssd_pallas_tpu(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   chunk_size: int = 256, D: jax.Array | None = None,
                   z: jax.Array | None = None, dt_bias: jax.Array | None = None,
                   dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                   initial_states: jax.Array | None = None, seq_idx: jax.Array | None = None,
                   return_final_states: bool = False, *,
                   blocks: SSDTpuBlockSizes | None = None, interpret=False):
  """Mamba-2 SSD (Dao & Gu 2024, §6 and §7.1), forward and backward as Pallas TPU kernels.

      dt_t ← clip(softplus(dt_t + dt_bias), *dt_limit)
      h_t  = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t
      y_t  = (h_t C_t + D x_t) · silu(z_t)

  Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_states. TPU speed is unmeasured.

  Args:
    x: (b, l, h, p) float32 / bfloat16 / float16; any l (padded to the chunk with dt = 0).
    dt: (b, l, h) raw steps, any floating dtype (processed in float32).
    A: (h,) negative decay rates.
    B, C: (b, l, g, n) in x's dtype; head i reads group i // (h // g).
    chunk_size: q, a multiple of 16 (64-256 on TPU); shortened to the padded length when the
      sequence is shorter.
    D: optional (h,) or (h, p) skip.
    z: optional (b, l, h, p) gate in x's dtype.
    dt_bias: optional (h,).
    dt_softplus: apply softplus to dt + dt_bias.
    dt_limit: clip range of the processed dt; (0, inf) means no clip.
    initial_states: optional (b, h, p, n), any floating dtype (used as float32).
    seq_idx: optional (b, l) integer, nondecreasing segment ids (not checked: it may be traced).
    return_final_states: also return the final states.
    blocks: block sizes; None picks ``default_block_sizes`` for this shape.
    interpret: False (compile with Mosaic), or ``pltpu.InterpretParams(...)`` to run the kernels
      in the TPU interpreter on CPU.

  Returns:
    y (b, l, h, p) in x's dtype; with ``return_final_states`` also the final states
    (b, h, p, n) float32.

  Raises:
    ValueError: on malformed arguments, or blocks that do not tile the heads or fit VMEM.
  """
  _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx)
  if interpret is not False and not isinstance(interpret, pltpu.InterpretParams):
    raise ValueError(f"interpret must be False or a pltpu.InterpretParams (TPU semantics), "
                     f"got {interpret!r}")
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  q = min(chunk_size, -(-l // 16) * 16)
  if blocks is None:
    blocks = default_block_sizes(q, h, g, p, n, x.dtype)
  elif blocks.chunk_size != q:
    raise ValueError(f"blocks.chunk_size={blocks.chunk_size} must equal the chunk used, {q} "
                     f"(chunk_size={chunk_size}, length={l})")
  blocks.check(h, g, p, n, x.dtype)
  pad = -l % q
  c = (l + pad) // q

  def kernel_layout(v):  # (b, l, k, m) -> (b, k, l + pad, m)
    return jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

  dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
  dtp = jnp.pad(dtp, [(0, 0), (0, pad), (0, 0)]).transpose(0, 2, 1).reshape(b, h, c, q)
  seq = None
  if seq_idx is not None:
    seq = jnp.pad(seq_idx.astype(jnp.int32), [(0, 0), (0, pad)], mode="edge").reshape(b, c, q)
  vec = _position_vectors(dtp, A.astype(jnp.float32), seq)
  d = None
  if D is not None:
    d = jnp.broadcast_to(D.astype(jnp.float32).reshape(h, -1), (h, p)).reshape(h, 1, p)
  init = None if initial_states is None else initial_states.astype(jnp.float32)
  y, final = _ssd_core(kernel_layout(x), kernel_layout(B), kernel_layout(C), vec, d,
                       None if z is None else kernel_layout(z), init, blocks,
                       seq_idx is not None, interpret)
  y = y.transpose(0, 2, 1, 3)[:, :l]
  return (y, final) if return_final_states else y
