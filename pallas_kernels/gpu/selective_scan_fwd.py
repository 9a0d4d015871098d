"""The selective-scan (S6) forward as one fused Pallas GPU kernel (Triton lowering).

Mamba §3.2 Algorithm 2 with the simplified discretization (Mamba §2 eq. (4)) and mamba_ssm's
``selective_scan_fn`` semantics, per channel i and state k:

  Δ_t   = softplus(delta_t + delta_bias)        (bias and softplus optional)
  h_t   = exp(Δ_t A) ⊙ keep_t h_{t−1} + Δ_t u_t B_t      (keep_t = 0 where seq_idx changes)
  y_t   = (C_t · h_t + D u_t) · silu(z_t)                 (D and z optional)

One program per (batch row, block of ``block_d`` channels of one group): the (block_d, n)
float32 state lives in registers and a sequential loop walks the length, one position per
step; each step reads one row of u, delta, z (block_d values) and of B, C (n values) and writes
one row of y, so the expanded state (b, l, d, n) never reaches memory. When the backward needs
them, the state entering every chunk of ``block_l`` positions is written out,
(b, l / block_l, d, n) float32 — the only residual besides the inputs, as in mamba_ssm's CUDA
kernel (whose chunk is 2048).

Padding: the wrapper pads the length to a multiple of ``block_l`` with zero inputs; the kernel
sets Δ = 0 beyond ``length`` (decay 1, input 0), so padding carries the final state unchanged.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU. The Triton backend
is deprecated since JAX 0.11; ``selective_scan_mgpu`` is the Mosaic GPU port of this forward
(``plgpu.kernel`` with one warpgroup per block of channels), and what a port of the backward
would change: the per-step rows of u, Δ, z, B, C would be staged through
shared memory by ``plgpu.emit_pipeline`` in chunks of positions (TMA copies instead of one
global load per step), the chunk-boundary states and the backward's sub-chunk states would live
in shared memory instead of registers / recomputation, and dB / dC would be reduced across the
warpgroup in shared memory rather than written as per-block partial sums.

Shape legend: b batch, l padded length, d d_inner, n d_state (a power of two), g groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import is_power_of_two, silu_and_grad, softplus


@dataclasses.dataclass(frozen=True)
class ScanGpuBlockSizes:
  """Block sizes of the GPU selective-scan kernels.

  Attributes:
    block_d: channels per program (a power of two dividing d_inner / groups). The program's
      state is block_d × n float32 values in registers.
    block_l: positions between saved chunk-boundary states (``sub_l`` times a power of two: the
      backward holds the block_l / sub_l sub-chunk states in one register tensor); the saved
      states cost d·n·4 / block_l bytes per token (block_l = 64, n = 16: d bytes, a quarter of
      bf16 u's).
    sub_l: positions per unrolled step block of the backward: it keeps sub_l + 1 states of
      block_d × n float32 in registers at once.
    num_warps: Triton warps per program.
  """
  block_d: int = 32
  block_l: int = 64
  sub_l: int = 16
  num_warps: int = 4

  def __post_init__(self):
    if not is_power_of_two(self.block_d):
      raise ValueError(f"block_d={self.block_d} must be a power of two")
    if self.sub_l < 1:
      raise ValueError(f"sub_l={self.sub_l} must be positive")
    if self.block_l < 1 or self.block_l % self.sub_l \
        or not is_power_of_two(self.block_l // self.sub_l):
      raise ValueError(f"block_l={self.block_l} must be sub_l={self.sub_l} times a power of "
                       "two")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps={self.num_warps} must be one of 1, 2, 4, 8, 16")

  def check(self, d_inner: int, groups: int, d_state: int) -> None:
    """Raises unless a block of channels lies in one group and n is a power of two."""
    per_group = d_inner // groups
    if per_group % self.block_d:
      raise ValueError(f"block_d={self.block_d} must divide d_inner / groups = {per_group} "
                       f"(d_inner={d_inner}, groups={groups})")
    if not is_power_of_two(d_state):
      raise ValueError(f"d_state={d_state} must be a power of two for the GPU kernels")

  def compiler_params(self) -> pl_triton.CompilerParams:
    return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=1)


MIN_PROGRAMS = 1024  # ~8 programs per SM of an H100 (132 SMs) to hide the per-step latency


def default_block_sizes(d_inner: int, groups: int, batch: int) -> ScanGpuBlockSizes:
  """The default blocks: block_d the largest power of two <= 32 dividing d_inner / g, halved
  (down to 4) while the grid has fewer than ``MIN_PROGRAMS`` programs — long sequences come in
  small batches, and each program walks its whole sequence serially."""
  per_group = d_inner // groups
  block_d = 32
  while per_group % block_d or (block_d > 4 and batch * (d_inner // block_d) < MIN_PROGRAMS):
    block_d //= 2
  return ScanGpuBlockSizes(block_d=block_d)


def step_inputs(t, u_ref, delta_ref, b_ref, bias, keep_ref, a, *, length: int, padded: bool,
                delta_softplus: bool):
  """The per-position quantities of step t, shared by the forward and backward kernels.

  Returns u (bd,), the pre-softplus delta x (bd,), Δ (bd,), B (n,), decay (bd, n), all float32;
  Δ is 0 beyond ``length`` and the decay is masked by keep_t.
  """
  u = u_ref[t, :].astype(jnp.float32)
  x = delta_ref[t, :].astype(jnp.float32)
  if bias is not None:
    x = x + bias
  dt = softplus(x) if delta_softplus else x
  if padded:
    dt = jnp.where(t < length, dt, 0.0)
  decay = jnp.exp(dt[:, None] * a)
  if keep_ref is not None:
    decay = decay * keep_ref[t]
  return u, x, dt, b_ref[t, :].astype(jnp.float32), decay


def _fwd_kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_init: bool,
                has_keep: bool, save_states: bool, length: int, padded: bool,
                delta_softplus: bool, block_l: int):
  """One (batch row, channel block) program; refs in the order built by ``scan_fwd``.

  u_ref, delta_ref, z_ref, y_ref (l, bd); a_ref (bd, n) float32; b_ref, c_ref (l, n);
  d_ref, bias_ref (bd,) float32; init_ref, final_ref (bd, n) float32; keep_ref (l,) float32;
  states_ref (c, bd, n) float32.
  """
  refs = list(refs)
  u_ref, delta_ref, a_ref, b_ref, c_ref = refs[:5]
  del refs[:5]
  d_ref = refs.pop(0) if has_d else None
  z_ref = refs.pop(0) if has_z else None
  bias_ref = refs.pop(0) if has_bias else None
  init_ref = refs.pop(0) if has_init else None
  keep_ref = refs.pop(0) if has_keep else None
  y_ref, final_ref = refs[:2]
  states_ref = refs[2] if save_states else None

  a = a_ref[...]
  d = d_ref[...] if has_d else None
  bias = bias_ref[...] if has_bias else None
  chunks = u_ref.shape[0] // block_l
  h0 = init_ref[...] if has_init else jnp.zeros(a.shape, jnp.float32)

  def step(t, h):
    u, _, dt, b, decay = step_inputs(t, u_ref, delta_ref, b_ref, bias, keep_ref, a,
                                     length=length, padded=padded,
                                     delta_softplus=delta_softplus)
    h = decay * h + (dt * u)[:, None] * b[None, :]
    y = jnp.sum(h * c_ref[t, :].astype(jnp.float32)[None, :], axis=1)
    if has_d:
      y = y + d * u
    if has_z:
      y = y * silu_and_grad(z_ref[t, :].astype(jnp.float32))[0]
    y_ref[t, :] = y.astype(y_ref.dtype)
    return h

  def chunk(c, h):
    if save_states:
      states_ref[c] = h
    return lax.fori_loop(0, block_l, lambda j, h: step(c * block_l + j, h), h)

  final_ref[...] = lax.fori_loop(0, chunks, chunk, h0)


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "save_states",
                                             "blocks", "interpret"))
def scan_fwd(u: jax.Array, delta: jax.Array, a: jax.Array, B: jax.Array, C: jax.Array,
             d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
             init: jax.Array | None, keep: jax.Array | None, *, length: int,
             delta_softplus: bool, save_states: bool, blocks: ScanGpuBlockSizes,
             interpret: bool = False):
  """The fused forward over the padded length (see the module docstring for the equations).

  Args:
    u, delta: (b, l, d) float32 / bf16 / fp16, l a multiple of ``blocks.block_l``.
    a: (d, n) float32, A.
    B, C: (b, l, g, n) float32 / bf16 / fp16; channel i reads group i // (d / g).
    d: optional (d,) float32 skip D.
    z: optional (b, l, d) gate.
    bias: optional (d,) float32 delta_bias.
    init: optional (b, d, n) float32 initial state.
    keep: optional (b, l) float32 decay mask from ``selective_scan_args.decay_keep``.
    length: the true length (positions at or beyond it are padding).
    delta_softplus: Δ = softplus(delta + bias) instead of delta + bias.
    save_states: also return the chunk-entering states.
    blocks: block sizes.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    y (b, l, d) in u's dtype, the final state (b, d, n) float32, and with ``save_states`` the
    state entering every chunk of block_l positions, (b, l / block_l, d, n) float32.
  """
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[2], B.shape[3]
  bd = blocks.block_d
  per_group_blocks = d_inner // groups // bd
  chunks = padded_length // blocks.block_l

  seq_spec = pl.BlockSpec((None, padded_length, bd), lambda j, bi: (bi, 0, j))
  group_spec = pl.BlockSpec((None, padded_length, None, d_state),
                            lambda j, bi: (bi, 0, j // per_group_blocks, 0))
  state_spec = pl.BlockSpec((None, bd, d_state), lambda j, bi: (bi, j, 0))
  vec_spec = pl.BlockSpec((bd,), lambda j, bi: (j,))
  in_specs = [seq_spec, seq_spec, pl.BlockSpec((bd, d_state), lambda j, bi: (j, 0)),
              group_spec, group_spec]
  args = [u, delta, a, B, C]
  for x, spec in ((d, vec_spec), (z, seq_spec), (bias, vec_spec), (init, state_spec),
                  (keep, pl.BlockSpec((None, padded_length), lambda j, bi: (bi, 0)))):
    if x is not None:
      in_specs.append(spec)
      args.append(x)
  out_specs = [seq_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, d_inner, d_state), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, chunks, bd, d_state), lambda j, bi: (bi, 0, j, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, chunks, d_inner, d_state), jnp.float32))
  kernel = functools.partial(
      _fwd_kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_init=init is not None, has_keep=keep is not None, save_states=save_states,
      length=length, padded=length != padded_length, delta_softplus=delta_softplus,
      block_l=blocks.block_l)
  return pl.pallas_call(
      kernel,
      grid=(d_inner // bd, batch),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
      name="selective_scan_fwd",
  )(*args)
