"""Mamba-2's decoding step after in_proj as one Pallas GPU kernel (Triton lowering): the conv
step and the SSD state update fused, reading in_proj's output row as it is.

The kernel form of ``mamba_jax.ops.ssd_decode_step.ssd_decode_step`` (whose XLA form splits
in_proj's output and runs ``causal_conv1d_update`` then ``ssd_state_update``). With
zxbcdt in ``Mamba2Mixer``'s layout ([z0, x0] of d_mlp each, then per group: z, x of its
r = h / g heads, B, C, dt of its heads) and per head i of group g, head dim j, state k:

  xBC'  = silu(conv_step(xBC, conv_state))           rounded to zxbcdt's dtype, as the reference
  dt    = clip(softplus(dt_raw + dt_bias), *dt_limit)   (softplus / clip when asked)
  A     = −exp(A_log)
  h'    = exp(dt A_i) h + dt x'_ij B'_g              (Mamba-2 §3.1 eq. (2), one token)
  y_ij  = (Σ_k h'_ijk C'_gk + D x'_ij) · silu(z_ij)   (D optional; the gate when ``gate``)

One program per (batch row, head, block of ``block_p`` head dims): it convolves its own x
channels and its group's B and C (n channels each, recomputed by every program of the group:
2·n·w multiply-adds), updates its (block_p, n) float32 state tile and writes y. The new conv
state of the B and C channels is written by the group's first program. The state is updated
in place (``input_output_aliases``), so a decoding loop's carried buffer is not copied. The
kernel reads x, B, C, dt (and z) at their offsets in the in_proj row and computes A from A_log
itself: a custom call's operands are materialized buffers, so slices of the row or −exp(A_log)
passed in would each cost a kernel of their own per layer and token.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: b batch, m d_mlp, c = h·p + 2·g·n conv channels, w conv width, h heads,
p head_dim, n d_state, g groups, r = h / g heads per group.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.causal_conv1d_update import conv_window, store_shifted_state
from pallas_kernels.gpu.selective_scan_args import INPUT_DTYPES, is_power_of_two, softplus


def default_blocks(batch: int, heads: int, head_dim: int) -> tuple[int, int]:
  """(block_p, num_warps): head_dim halved (down to 16) while there are fewer than 128
  programs; 4 warps while there are fewer than 1024 programs, else 2.

  Measured on an H100: in mamba2-1.3b's batch-1 decoding loop (scripts/profile_decode.py) the
  kernel took 4.4 µs per layer with 32 head dims per program (128 programs) and 5.6 µs with
  whole heads (64); at batch 64 (4,096 programs of whole heads; scripts/bench_decode_step.py)
  2 warps reached 80 % of the copy ceiling against 72 % with 4 (mamba2-130m: 73 / 66 %).
  """
  block = head_dim
  while block > 16 and batch * heads * (head_dim // block) < 128:
    block //= 2
  programs = batch * heads * (head_dim // block)
  return block, (4 if programs < 1024 else 2)


def in_proj_width(d_mlp: int, heads: int, head_dim: int, groups: int, d_state: int) -> int:
  """in_proj's output width: 2·m + 2·h·p + 2·g·n + h."""
  return 2 * d_mlp + 2 * heads * head_dim + 2 * groups * d_state + heads


def check_supported(zxbcdt, conv_state, conv_weight, ssm_state) -> str:
  """'' when the kernel takes these shapes and dtypes, else why not."""
  width = conv_weight.shape[1]
  p, n = ssm_state.shape[2], ssm_state.shape[3]
  if width < 2 or conv_state.shape[2] != width - 1:
    return (f"the kernel needs a conv width >= 2 and a conv_state of length width - 1, got "
            f"width {width}, conv_state shape {tuple(conv_state.shape)}")
  if not (is_power_of_two(p) and is_power_of_two(n)):
    return f"the kernel needs head_dim and d_state powers of two, got {p} and {n}"
  for name, a in (("zxbcdt", zxbcdt), ("conv_state", conv_state), ("conv_weight", conv_weight),
                  ("ssm_state", ssm_state)):
    if jnp.dtype(a.dtype) not in INPUT_DTYPES:
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  return ""


def _kernel(*refs, width: int, d_mlp: int, r: int, p: int, n: int, block_p: int, batch: int,
            out_rows: int, has_bias: bool, has_D: bool, D_per_dim: bool, gate: bool,
            has_dt_bias: bool, dt_softplus: bool, dt_limit: tuple[float, float]):
  """One (batch row, head, block of head dims): the module docstring's equations."""
  refs = list(refs)
  take = lambda present: refs.pop(0) if present else None
  row_ref, conv_ref, weight_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  bias_ref = take(has_bias)
  a_log_ref, state_ref = refs.pop(0), refs.pop(0)
  d_ref, dt_bias_ref = take(has_D), take(has_dt_bias)
  y_ref, new_conv_ref, new_state_ref = refs

  bi, head, pj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g, head_in_group = head // r, head % r
  group_width = r * p
  row_start = 2 * d_mlp + g * (2 * group_width + 2 * n + r)  # this group's [z, xBC, dt]
  conv_start = g * (group_width + 2 * n)  # this group's xBC in the conv's channels
  dtype = row_ref.dtype
  offset = head_in_group * p + pj * block_p  # x channels of this program within the group

  def conv(at, count):
    """The conv of group channels [at, at + count) (xBC offsets)."""
    x_in = row_ref[pl.ds(row_start + group_width + at, count)]
    acc, cols = conv_window(x_in, conv_ref, weight_ref, bias_ref, conv_start + at, count,
                            width, silu=True)
    return acc.astype(dtype).astype(jnp.float32), x_in, cols

  x, x_in, x_cols = conv(offset, block_p)
  store_shifted_state(new_conv_ref, conv_start + offset, block_p, x_in, x_cols)
  B, b_in, b_cols = conv(group_width, n)
  C, c_in, c_cols = conv(group_width + n, n)

  @pl.when(jnp.logical_and(head_in_group == 0, pj == 0))
  def _():
    store_shifted_state(new_conv_ref, conv_start + group_width, n, b_in, b_cols)
    store_shifted_state(new_conv_ref, conv_start + group_width + n, n, c_in, c_cols)

  one = pl.ds(head, 1)
  dt = row_ref[pl.ds(row_start + 2 * group_width + 2 * n + head_in_group, 1)]
  dt = dt.astype(jnp.float32)  # (1,)
  if has_dt_bias:
    dt = dt + dt_bias_ref[one].astype(jnp.float32)
  if dt_softplus:
    dt = softplus(dt)
  if dt_limit != (0.0, float("inf")):
    dt = jnp.minimum(jnp.maximum(dt, dt_limit[0]), dt_limit[1])
  decay = jnp.exp(-dt * jnp.exp(a_log_ref[one].astype(jnp.float32)))  # exp(dt A), (1,)
  state = state_ref[...].astype(jnp.float32)  # (block_p, n)
  new = decay[:, None] * state + (dt * x)[:, None] * B[None, :]
  new_state_ref[...] = new.astype(new_state_ref.dtype)
  y = jnp.sum(new * C[None, :], axis=1)  # (block_p,)
  if has_D:
    skip = d_ref[head, pl.ds(pj * block_p, block_p)] if D_per_dim else d_ref[one]
    y = y + x * skip.astype(jnp.float32)
  if gate:
    z = row_ref[pl.ds(row_start + offset, block_p)].astype(jnp.float32)
    y = y * z / (1.0 + jnp.exp(-z))
  dims = pl.ds(pj * block_p, block_p)
  y_ref[bi, head, dims] = y.astype(y_ref.dtype)
  for extra in range(batch, out_rows):  # zero rows, written once (by batch row 0)
    @pl.when(bi == 0)
    def _():
      y_ref[extra, head, dims] = jnp.zeros((block_p,), y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("d_mlp", "groups", "gate", "dt_softplus",
                                             "dt_limit", "out_rows", "block_p", "num_warps",
                                             "interpret"))
def ssd_decode_step_pallas(zxbcdt: jax.Array, conv_state: jax.Array, conv_weight: jax.Array,
                           conv_bias: jax.Array | None, ssm_state: jax.Array, A_log: jax.Array,
                           D: jax.Array | None, dt_bias: jax.Array | None, *, d_mlp: int,
                           groups: int, gate: bool, dt_softplus: bool,
                           dt_limit: tuple[float, float], out_rows: int | None = None,
                           block_p: int | None = None,
                           num_warps: int | None = None, interpret: bool = False):
  """The module docstring's step on validated arguments (``ssd_decode_step``'s checks).

  Args:
    zxbcdt: (b, 2·m + 2·h·p + 2·g·n + h) in_proj's output.
    conv_state: (b, c, w − 1). conv_weight: (c, w). conv_bias: optional (c,).
    ssm_state: (b, h, p, n).
    A_log: (h,), A = −exp(A_log). D: optional (h,) or (h, p). dt_bias: optional (h,).
    d_mlp: m. groups: g (B and C groups).
    gate: multiply y by silu(z) (Mamba2Mixer with rmsnorm=False).
    dt_softplus, dt_limit: as ``ssd_state_update``.
    out_rows: rows of y, >= b (default b); rows past b are zeros (at batch 1 the mixer asks
      for 2: the gated norm then hands out_proj two rows, a GEMM without a pad kernel).
    block_p: head dims per program (a power of two dividing p); num_warps: warps per program
      (Triton). None takes the value of ``default_blocks``.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (y (out_rows, h, p) in zxbcdt's dtype, new conv_state (b, c, w − 1) in its dtype, new
    ssm_state (b, h, p, n) in its dtype).
  """
  batch, row_width = zxbcdt.shape
  out_rows = out_rows or batch
  _, h, p, n = ssm_state.shape
  channels, width = conv_weight.shape
  default_p, default_warps = default_blocks(batch, h, p)
  block_p, num_warps = block_p or default_p, num_warps or default_warps
  if not (is_power_of_two(block_p) and p % block_p == 0):
    raise ValueError(f"block_p must be a power of two dividing head_dim {p}, got {block_p}")
  row = pl.BlockSpec((None, row_width), lambda bi, i, j: (bi, 0))
  conv_row = pl.BlockSpec((None, channels, width - 1), lambda bi, i, j: (bi, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda bi, i, j: (0,) * len(shape))
  state_tile = pl.BlockSpec((None, None, block_p, n), lambda bi, i, j: (bi, i, j, 0))

  # The kernel's inputs in order; the optional ones only when given.
  inputs = [(zxbcdt, row), (conv_state, conv_row), (conv_weight, whole(conv_weight.shape))]
  if conv_bias is not None:
    inputs.append((conv_bias, whole(conv_bias.shape)))
  inputs.append((A_log, whole(A_log.shape)))
  state_index = len(inputs)  # updated in place: aliased to the third output
  inputs.append((ssm_state, state_tile))
  for a in (D, dt_bias):
    if a is not None:
      inputs.append((a, whole(a.shape)))
  kernel = functools.partial(
      _kernel, width=width, d_mlp=d_mlp, r=h // groups, p=p, n=n, block_p=block_p,
      batch=batch, out_rows=out_rows,
      has_bias=conv_bias is not None, has_D=D is not None,
      D_per_dim=D is not None and D.ndim == 2, gate=gate, has_dt_bias=dt_bias is not None,
      dt_softplus=dt_softplus, dt_limit=(float(dt_limit[0]), float(dt_limit[1])))
  return pl.pallas_call(
      kernel,
      grid=(batch, h, p // block_p),
      in_specs=[spec for _, spec in inputs],
      out_specs=[whole((out_rows, h, p)), conv_row, state_tile],
      out_shape=[jax.ShapeDtypeStruct((out_rows, h, p), zxbcdt.dtype),
                 jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
                 jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype)],
      input_output_aliases={state_index: 2},
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="ssd_decode_step",
  )(*[a for a, _ in inputs])
