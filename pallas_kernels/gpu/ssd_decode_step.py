"""Mamba-2's decoding step after in_proj as one Pallas GPU kernel (Triton lowering): the conv
step and the SSD state update fused.

The kernel form of ``mamba_jax.ops.ssd_decode_step.ssd_decode_step`` (its reference is
``causal_conv1d_update`` followed by ``ssd_state_update``). With xBC in the grouped channel
order of ``Mamba2Mixer`` (per group: x of its r = h / g heads, then B, then C), per head i of
group g, head dim j, state k:

  xBC'  = silu(conv_step(xBC, conv_state))           rounded to xBC's dtype, as the reference
  dt    = clip(softplus(dt_raw + dt_bias), *dt_limit)   (softplus / clip when asked)
  h'    = exp(dt A_i) h + dt x'_ij B'_g              (Mamba-2 §3.1 eq. (2), one token)
  y_ij  = (Σ_k h'_ijk C'_gk + D x'_ij) · silu(z_ij)   (D and z optional)

One program per (batch row, head, block of ``block_p`` head dims): it convolves its own x
channels and its group's B and C (n channels each, recomputed by every program of the group:
2·n·w multiply-adds), updates its (block_p, n) float32 state tile and writes y. The new conv
state of the B and C channels is written by the group's first program. The state is updated
in place (``input_output_aliases``), so a decoding loop's carried buffer is not copied.

At batch 1 the XLA form of the same step is about five kernels (the conv window, its sum, the
dt / decay arithmetic, the state update and the readout); this is one.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: b batch, c = h·p + 2·g·n conv channels, w conv width, h heads, p head_dim,
n d_state, g groups, r = h / g heads per group.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.causal_conv1d_update import conv_window, store_shifted_state
from pallas_kernels.gpu.selective_scan_args import softplus

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_power_of_two(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def default_block_p(batch: int, heads: int, head_dim: int) -> int:
  """head_dim, halved (down to 16) while there are fewer than 128 programs."""
  block = head_dim
  while block > 16 and batch * heads * (head_dim // block) < 128:
    block //= 2
  return block


def check_supported(xBC, conv_state, conv_weight, ssm_state, groups: int) -> str:
  """'' when the kernel takes these shapes and dtypes, else why not."""
  width = conv_weight.shape[1]
  p, n = ssm_state.shape[2], ssm_state.shape[3]
  if width < 2 or conv_state.shape[2] != width - 1:
    return (f"the kernel needs a conv width >= 2 and a conv_state of length width - 1, got "
            f"width {width}, conv_state shape {tuple(conv_state.shape)}")
  if not (_is_power_of_two(p) and _is_power_of_two(n)):
    return f"the kernel needs head_dim and d_state powers of two, got {p} and {n}"
  for name, a in (("xBC", xBC), ("conv_state", conv_state), ("conv_weight", conv_weight),
                  ("ssm_state", ssm_state)):
    if jnp.dtype(a.dtype) not in KERNEL_DTYPES:
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  if xBC.shape[1] != ssm_state.shape[1] * p + 2 * groups * n:
    return f"xBC has {xBC.shape[1]} channels, expected heads·head_dim + 2·groups·d_state"
  return ""


def _kernel(*refs, width: int, r: int, group_width: int, n: int, block_p: int,
            has_bias: bool, has_D: bool, D_per_dim: bool, has_z: bool, has_dt_bias: bool,
            dt_softplus: bool, dt_limit: tuple[float, float]):
  """One (batch row, head, block of head dims): the module docstring's equations."""
  refs = list(refs)
  take = lambda present: refs.pop(0) if present else None
  xbc_ref, conv_ref, weight_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  bias_ref = take(has_bias)
  dt_ref, a_ref, state_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  d_ref, z_ref, dt_bias_ref = take(has_D), take(has_z), take(has_dt_bias)
  y_ref, new_conv_ref, new_state_ref = refs

  head, pj = pl.program_id(1), pl.program_id(2)
  g = head // r
  group_start = g * (group_width + 2 * n)
  x_start = group_start + (head % r) * (group_width // r) + pj * block_p
  xbc_dtype = xbc_ref.dtype

  def conv(start, count):
    acc, xv, cols = conv_window(xbc_ref, conv_ref, weight_ref, bias_ref, start, count, width,
                                silu=True)
    return acc.astype(xbc_dtype).astype(jnp.float32), xv, cols

  x, x_in, x_cols = conv(x_start, block_p)
  store_shifted_state(new_conv_ref, x_start, block_p, x_in, x_cols)
  b_start, c_start = group_start + group_width, group_start + group_width + n
  B, b_in, b_cols = conv(b_start, n)
  C, c_in, c_cols = conv(c_start, n)

  @pl.when(jnp.logical_and(head % r == 0, pj == 0))
  def _():
    store_shifted_state(new_conv_ref, b_start, n, b_in, b_cols)
    store_shifted_state(new_conv_ref, c_start, n, c_in, c_cols)

  one = pl.ds(head, 1)
  dt = dt_ref[one].astype(jnp.float32)  # (1,)
  if has_dt_bias:
    dt = dt + dt_bias_ref[one].astype(jnp.float32)
  if dt_softplus:
    dt = softplus(dt)
  if dt_limit != (0.0, float("inf")):
    dt = jnp.minimum(jnp.maximum(dt, dt_limit[0]), dt_limit[1])
  decay = jnp.exp(dt * a_ref[one].astype(jnp.float32))  # (1,)
  state = state_ref[...].astype(jnp.float32)  # (block_p, n)
  new = decay[:, None] * state + (dt * x)[:, None] * B[None, :]
  new_state_ref[...] = new.astype(new_state_ref.dtype)
  y = jnp.sum(new * C[None, :], axis=1)  # (block_p,)
  if has_D:
    skip = d_ref[head, pl.ds(pj * block_p, block_p)] if D_per_dim else d_ref[one]
    y = y + x * skip.astype(jnp.float32)
  if has_z:
    zv = z_ref[...].astype(jnp.float32)
    y = y * zv / (1.0 + jnp.exp(-zv))
  y_ref[...] = y.astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("groups", "dt_softplus", "dt_limit", "block_p",
                                             "interpret"))
def ssd_decode_step_pallas(xBC: jax.Array, conv_state: jax.Array, conv_weight: jax.Array,
                           conv_bias: jax.Array | None, ssm_state: jax.Array, dt: jax.Array,
                           A: jax.Array, D: jax.Array | None, z: jax.Array | None,
                           dt_bias: jax.Array | None, *, groups: int, dt_softplus: bool,
                           dt_limit: tuple[float, float], block_p: int | None = None,
                           interpret: bool = False):
  """The module docstring's step on validated arguments (``ssd_decode_step``'s checks).

  Args:
    xBC: (b, c) in_proj's x, B, C before the conv, grouped channel order.
    conv_state: (b, c, w − 1). conv_weight: (c, w). conv_bias: optional (c,).
    ssm_state: (b, h, p, n).
    dt: (b, h) raw. A: (h,). D: optional (h,) or (h, p). z: optional (b, h, p).
    dt_bias: optional (h,).
    groups: g (B and C groups).
    dt_softplus, dt_limit: as ``ssd_state_update``.
    block_p: head dims per program (a power of two dividing p); default ``default_block_p``.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (y (b, h, p) in xBC's dtype, new conv_state (b, c, w − 1) in its dtype, new ssm_state
    (b, h, p, n) in its dtype).
  """
  batch, channels = xBC.shape
  _, h, p, n = ssm_state.shape
  width = conv_weight.shape[1]
  block_p = block_p or default_block_p(batch, h, p)
  if not (_is_power_of_two(block_p) and p % block_p == 0):
    raise ValueError(f"block_p must be a power of two dividing head_dim {p}, got {block_p}")
  grid = (batch, h, p // block_p)
  row = pl.BlockSpec((None, channels), lambda bi, i, j: (bi, 0))
  conv_row = pl.BlockSpec((None, channels, width - 1), lambda bi, i, j: (bi, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda bi, i, j: (0,) * len(shape))
  tile = pl.BlockSpec((None, None, block_p), lambda bi, i, j: (bi, i, j))
  state_tile = pl.BlockSpec((None, None, block_p, n), lambda bi, i, j: (bi, i, j, 0))
  per_row = pl.BlockSpec((None, h), lambda bi, i, j: (bi, 0))

  # The kernel's inputs in order; the optional ones only when given.
  inputs = [(xBC, row), (conv_state, conv_row), (conv_weight, whole(conv_weight.shape))]
  if conv_bias is not None:
    inputs.append((conv_bias, whole(conv_bias.shape)))
  inputs += [(dt, per_row), (A, whole(A.shape))]
  state_index = len(inputs)  # updated in place: aliased to the third output
  inputs.append((ssm_state, state_tile))
  for a, spec in ((D, None), (z, tile), (dt_bias, None)):
    if a is not None:
      inputs.append((a, spec or whole(a.shape)))
  kernel = functools.partial(
      _kernel, width=width, r=h // groups, group_width=h // groups * p, n=n, block_p=block_p,
      has_bias=conv_bias is not None, has_D=D is not None,
      D_per_dim=D is not None and D.ndim == 2, has_z=z is not None,
      has_dt_bias=dt_bias is not None, dt_softplus=dt_softplus,
      dt_limit=(float(dt_limit[0]), float(dt_limit[1])))
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[spec for _, spec in inputs],
      out_specs=[tile, conv_row, state_tile],
      out_shape=[jax.ShapeDtypeStruct((batch, h, p), xBC.dtype),
                 jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
                 jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype)],
      input_output_aliases={state_index: 2},
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="ssd_decode_step",
  )(*[a for a, _ in inputs])
