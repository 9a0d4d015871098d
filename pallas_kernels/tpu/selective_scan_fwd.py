"""The selective-scan (S6) forward as one fused Pallas Mosaic TPU kernel.

Mamba §3.2 Algorithm 2 with the simplified discretization (Mamba §2 eq. (4)) and mamba_ssm's
``selective_scan_fn`` semantics, per channel i and state k:

  Δ_t   = softplus(delta_t + delta_bias)        (bias and softplus optional)
  h_t   = exp(Δ_t A) ⊙ keep_t h_{t−1} + Δ_t u_t B_t      (keep_t = 0 where seq_idx changes)
  y_t   = (C_t · h_t + D u_t) · silu(z_t)                 (D and z optional)

Grid (b, d / block_d, l / block_l): batch and channel blocks "parallel", the length chunks last
and "arbitrary". The state h (n, block_d) float32 — n on sublanes, channels on lanes — lives in
VMEM scratch, initialised at chunk 0. Inside a chunk, a loop over groups of ``ROWS`` = 16
positions loads (16, block_d) tiles of u, delta, z (aligned sublane slices, also for 16-bit
dtypes) and (16, n) tiles of B, C; an unrolled loop over the 16 positions updates h with
(n, block_d) vector ops (B_t and C_t turned into (n, 1) columns by a masked lane reduction) and
gathers the 16 rows of y into one (16, block_d) tile, stored at once. The expanded state
(b, l, d, n) never leaves VMEM. When the backward needs them, the state entering each chunk is
written out, (b, l / block_l, n, d) float32.

VMEM (per grid step, inputs and outputs double-buffered, Mosaic's (8, 128) tiles): with
block_l = 128, block_d = 512, n = 16 and bf16 inputs the forward holds u, delta, z, y
(4 · 2 · 128 KiB), B, C ((128, 16) padded to 128 lanes: 2 · 2 · 32 KiB) and the states
(2 · 2 · 32 KiB): about 1.3 MiB; the backward (``selective_scan_bwd``) about 6.5 MiB, most of it
the chunk's recomputed states (129 · 16 · 512 · 4 bytes = 4.1 MiB). Both fit v5e's 16 MiB
scoped default with room for double-buffering; ``ScanTpuBlockSizes.vmem_bytes`` counts them and
``check`` raises past ``vmem_limit_bytes``. block_d = 512 gives each step 8 vregs of state per
(n = 16) — enough independent work to hide the latency of the exp on the EUP — and block_l = 128
makes a chunk's DMA of u 128 KiB (bf16), well past the per-DMA overhead.

TPU speed is unmeasured: no TPU was available. The kernel is tested in the TPU interpreter on
CPU and lowered to Mosaic (not compiled) in the tests.

Shape legend: b batch, l padded length, d padded d_inner, n d_state, g groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.gpu.selective_scan_args import silu_and_grad, softplus

ROWS = 16  # positions per unrolled group: one native sublane tile of 16-bit data
LANES = 128
MIB = 1 << 20


def _padded_bytes(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a (rows, cols) block in VMEM, padded to (8, 128) 32-bit / (16, 128) 16-bit tiles."""
  sublanes = 8 * (4 // itemsize)
  return (-(-rows // sublanes) * sublanes) * (-(-cols // LANES) * LANES) * itemsize


@dataclasses.dataclass(frozen=True)
class ScanTpuBlockSizes:
  """Block sizes of the TPU selective-scan kernels.

  Attributes:
    block_l: positions per grid step (a multiple of ``ROWS`` = 16); also the interval between
      saved states.
    block_d: channels per program (a multiple of 128, the lane width).
    vmem_limit_bytes: the scoped VMEM the kernels request from Mosaic.
  """
  block_l: int = 128
  block_d: int = 512
  vmem_limit_bytes: int = 32 * MIB

  def __post_init__(self):
    if self.block_l <= 0 or self.block_l % ROWS:
      raise ValueError(f"block_l={self.block_l} must be a positive multiple of {ROWS}")
    if self.block_d <= 0 or self.block_d % LANES:
      raise ValueError(f"block_d={self.block_d} must be a positive multiple of {LANES}")
    if not 4 * MIB <= self.vmem_limit_bytes <= 128 * MIB:
      raise ValueError(f"vmem_limit_bytes={self.vmem_limit_bytes} must be in [4 MiB, 128 MiB]")

  def vmem_bytes(self, d_state: int, itemsize: int, backward: bool) -> int:
    """VMEM of one grid step with every option on (inputs and outputs double-buffered)."""
    seq = _padded_bytes(self.block_l, self.block_d, itemsize)
    bc = _padded_bytes(self.block_l, d_state, itemsize)
    state = _padded_bytes(d_state, self.block_d, 4)
    keep = _padded_bytes(self.block_l, 1, 4)
    if backward:
      blocks = 8 * seq + 2 * bc + 2 * _padded_bytes(self.block_l, d_state, 4) + keep \
          + 4 * state
      scratch = (self.block_l + 1) * state + 2 * state
    else:
      blocks = 4 * seq + 2 * bc + keep + 3 * state
      scratch = state
    return 2 * blocks + scratch

  def check(self, d_state: int, itemsize: int) -> None:
    """Raises ValueError when a grid step needs more VMEM than ``vmem_limit_bytes``."""
    need = max(self.vmem_bytes(d_state, itemsize, bw) for bw in (False, True))
    if need > self.vmem_limit_bytes:
      raise ValueError(f"selective-scan TPU blocks {self} need {need / MIB:.1f} MiB of VMEM for "
                       f"d_state={d_state}; more than vmem_limit_bytes="
                       f"{self.vmem_limit_bytes / MIB:.0f} MiB: use a smaller block_l or block_d")

  def compiler_params(self) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=self.vmem_limit_bytes)


def row_to_col(row: jax.Array) -> jax.Array:
  """(1, n) -> (n, 1): the diagonal of the row broadcast down, summed along lanes (exact)."""
  n = row.shape[-1]
  eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def col_to_row(col: jax.Array) -> jax.Array:
  """(n, 1) -> (1, n): the diagonal of the column broadcast across, summed along sublanes."""
  n = col.shape[0]
  eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def put_row(tile: jax.Array, j: int, row: jax.Array) -> jax.Array:
  """``tile`` (ROWS, w) with row j replaced by ``row`` (1, w), by a select."""
  return jnp.where(lax.broadcasted_iota(jnp.int32, tile.shape, 0) == j, row, tile)


def load_rows(r0, pos0, u_ref, delta_ref, b_ref, bias, keep_ref, *, length: int,
              padded: bool, delta_softplus: bool):
  """The float32 inputs of positions r0 .. r0 + 15 of this chunk (pos0 = chunk start).

  Returns u, x (delta + bias, before the softplus), Δ (0 in the padding): (16, bd); B (16, n);
  keep (16, 1) or None.
  """
  rows = pl.ds(r0, ROWS)
  u = u_ref[rows, :].astype(jnp.float32)
  x = delta_ref[rows, :].astype(jnp.float32)
  if bias is not None:
    x = x + bias
  dt = softplus(x) if delta_softplus else x
  if padded:
    pos = pos0 + r0 + lax.broadcasted_iota(jnp.int32, (ROWS, 1), 0)
    dt = jnp.where(pos < length, dt, 0.0)
  keep = keep_ref[rows, :] if keep_ref is not None else None
  return u, x, dt, b_ref[rows, :].astype(jnp.float32), keep


def decay_at(j: int, dt, at, keep):
  """exp(Δ_t A) ⊙ keep_t for row j: (n, bd)."""
  decay = jnp.exp(dt[j:j + 1, :] * at)
  return decay if keep is None else decay * keep[j:j + 1, :]


def _fwd_kernel(*refs, has_d: bool, has_z: bool, has_bias: bool, has_init: bool,
                has_keep: bool, save_states: bool, length: int, padded: bool,
                delta_softplus: bool):
  """One (b, channel block, chunk) grid step; refs in the order built by ``scan_fwd``.

  u_ref, delta_ref, z_ref, y_ref (block_l, bd); at_ref (n, bd) float32 (Aᵀ); b_ref, c_ref
  (block_l, n); d_ref, bias_ref (1, bd) float32; init_ref, final_ref, states_ref (n, bd) float32;
  keep_ref (block_l, 1) float32; scratch state_ref (n, bd) float32.
  """
  refs = list(refs)
  u_ref, delta_ref, at_ref, b_ref, c_ref = refs[:5]
  del refs[:5]
  d_ref = refs.pop(0) if has_d else None
  z_ref = refs.pop(0) if has_z else None
  bias_ref = refs.pop(0) if has_bias else None
  init_ref = refs.pop(0) if has_init else None
  keep_ref = refs.pop(0) if has_keep else None
  y_ref, final_ref = refs[:2]
  del refs[:2]
  states_ref = refs.pop(0) if save_states else None
  (state_ref,) = refs

  chunk = pl.program_id(2)
  block_l = u_ref.shape[0]

  @pl.when(chunk == 0)
  def _():
    state_ref[...] = init_ref[...] if has_init else jnp.zeros_like(state_ref)

  if save_states:
    states_ref[...] = state_ref[...]
  at = at_ref[...]
  bias = bias_ref[...] if has_bias else None

  def rows(s, h):
    r0 = pl.multiple_of(s * ROWS, ROWS)
    u, _, dt, b, keep = load_rows(r0, chunk * block_l, u_ref, delta_ref, b_ref, bias, keep_ref,
                                  length=length, padded=padded, delta_softplus=delta_softplus)
    c = c_ref[pl.ds(r0, ROWS), :].astype(jnp.float32)
    du = dt * u
    y = jnp.zeros(u.shape, jnp.float32)
    for j in range(ROWS):
      h = decay_at(j, dt, at, keep) * h + row_to_col(b[j:j + 1, :]) * du[j:j + 1, :]
      y = put_row(y, j, jnp.sum(row_to_col(c[j:j + 1, :]) * h, axis=0, keepdims=True))
    if has_d:
      y = y + d_ref[...] * u
    if has_z:
      y = y * silu_and_grad(z_ref[pl.ds(r0, ROWS), :].astype(jnp.float32))[0]
    y_ref[pl.ds(r0, ROWS), :] = y.astype(y_ref.dtype)
    return h

  # int32 loop indices (they meet program_id) also under jax_enable_x64.
  h = lax.fori_loop(jnp.int32(0), jnp.int32(block_l // ROWS), rows, state_ref[...])
  state_ref[...] = h

  @pl.when(chunk == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = h


@functools.partial(jax.jit, static_argnames=("length", "delta_softplus", "save_states",
                                             "blocks", "interpret"))
def scan_fwd(u: jax.Array, delta: jax.Array, at: jax.Array, B: jax.Array, C: jax.Array,
             d: jax.Array | None, z: jax.Array | None, bias: jax.Array | None,
             init: jax.Array | None, keep: jax.Array | None, *, length: int,
             delta_softplus: bool, save_states: bool, blocks: ScanTpuBlockSizes,
             interpret=False):
  """The fused forward in the kernel layout (equations in the module docstring).

  Args:
    u, delta: (b, l, d) float32 / bf16 / fp16; l a multiple of block_l, d of block_d, every
      block of channels inside one group.
    at: (n, d) float32, Aᵀ.
    B, C: (b, g, l, n) float32 / bf16 / fp16.
    d: optional (1, d) float32 skip D.
    z: optional (b, l, d) gate.
    bias: optional (1, d) float32 delta_bias.
    init: optional (b, n, d) float32 initial state (transposed).
    keep: optional (b, l, 1) float32 decay mask.
    length: the true length (positions at or beyond it are padding: Δ = 0).
    delta_softplus: Δ = softplus(delta + bias).
    save_states: also return the chunk-entering states.
    blocks: block sizes.
    interpret: False, or ``pltpu.InterpretParams()`` to run in the TPU interpreter.

  Returns:
    y (b, l, d) in u's dtype, the final state (b, n, d) float32, and with ``save_states`` the
    chunk-entering states (b, l / block_l, n, d) float32.
  """
  batch, padded_length, d_inner = u.shape
  groups, d_state = B.shape[1], B.shape[3]
  bl, bd = blocks.block_l, blocks.block_d
  per_group_blocks = d_inner // groups // bd
  chunks = padded_length // bl

  seq_spec = pl.BlockSpec((None, bl, bd), lambda bi, j, c: (bi, c, j))
  group_spec = pl.BlockSpec((None, None, bl, d_state),
                            lambda bi, j, c: (bi, j // per_group_blocks, c, 0))
  state_spec = pl.BlockSpec((None, d_state, bd), lambda bi, j, c: (bi, 0, j))
  vec_spec = pl.BlockSpec((1, bd), lambda bi, j, c: (0, j))
  in_specs = [seq_spec, seq_spec, pl.BlockSpec((d_state, bd), lambda bi, j, c: (0, j)),
              group_spec, group_spec]
  args = [u, delta, at, B, C]
  for x, spec in ((d, vec_spec), (z, seq_spec), (bias, vec_spec), (init, state_spec),
                  (keep, pl.BlockSpec((None, bl, 1), lambda bi, j, c: (bi, c, 0)))):
    if x is not None:
      in_specs.append(spec)
      args.append(x)
  out_specs = [seq_spec, state_spec]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, d_state, d_inner), jnp.float32)]
  if save_states:
    out_specs.append(pl.BlockSpec((None, None, d_state, bd), lambda bi, j, c: (bi, c, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((batch, chunks, d_state, d_inner), jnp.float32))
  kernel = functools.partial(
      _fwd_kernel, has_d=d is not None, has_z=z is not None, has_bias=bias is not None,
      has_init=init is not None, has_keep=keep is not None, save_states=save_states,
      length=length, padded=length != padded_length, delta_softplus=delta_softplus)
  return pl.pallas_call(
      kernel,
      grid=(batch, d_inner // bd, chunks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((d_state, bd), jnp.float32)],
      compiler_params=blocks.compiler_params(),
      interpret=interpret,
      name="selective_scan_fwd",
  )(*args)
