"""The depthwise causal conv over a whole sequence, forward and backward, as Pallas GPU kernels.

The kernel form of ``mamba_jax.ops.causal_conv1d.causal_conv1d`` (Mamba §3.4, Mamba-2 §7.1:
the short conv in front of the SSM) for the training path (no ``seq_idx``, no initial or final
states), per channel c and position t, with x[t'] = 0 for t' < 0:

  pre[t, c] = bias[c] + Σ_{k<w} weight[c, k] · x[t − (w − 1) + k, c],   y = act(pre)

act = silu or identity. Its backward, with dpre = dy · act'(pre) (silu'(u) = σ(u)(1 + u(1 − σ(u))),
pre recomputed from x rather than saved):

  dx[t, c]        = Σ_{k<w} weight[c, k] · dpre[t + (w − 1) − k, c]
  dweight[c, k]   = Σ_{b,t} dpre[t, c] · x[t − (w − 1) + k, c]
  dbias[c]        = Σ_{b,t} dpre[t, c]

Arithmetic in float32; y and dx are rounded to x's dtype.

Forward: one program per (batch row, tile of ``block_l`` positions, tile of ``block_c``
channels); it reads the w shifted (block_l, block_c) windows of x (the overlap comes from the
cache) and writes its tile of y once. XLA's form of the same sum (shifted slices of a padded
copy) ran at about half the copy bandwidth on an H100, and its autodiff materialised float32
intermediates of the whole (b, l, c) tensor in the backward.

Backward: one program per (batch row, run of ``sub_tiles`` tiles of ``block_l`` positions,
tile of channels). For each tile it reads x at the 2w − 1 shifts −(w − 1) .. w − 1 and dy at
0 .. w − 1, recomputes pre at the w shifts 0 .. w − 1, writes dx, and accumulates its
dweight / dbias partial in registers over the run; the wrapper sums the (b, runs, ...) float32
partials.

Positions outside [0, l) are read at a clamped index and masked: in the Pallas interpreter a
window that starts before 0 (``pl.ds`` with a negative start) reads garbage, while clamped
integer-array indices behave the same compiled and interpreted.

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: b batch, l length, c channels, w conv width.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MIN_BLOCK_C = 16


class ConvBlocks(NamedTuple):
  """Tiles of the kernels: ``block_l`` positions × ``block_c`` channels (at most: the largest
  power of two <= it dividing c), ``sub_tiles`` tiles per backward program (its dweight /
  dbias partial accumulates over them), ``num_warps``."""
  block_l: int
  block_c: int
  sub_tiles: int
  num_warps: int


# From scripts/sweep_conv_blocks.py on an H100 at Mamba-2 130M's conv (16 × 2048 × 1792, bf16):
# forward 0.132 ms (59 % of the copy floor), backward 0.427 ms (27 %; (32, 128, 8, 4) took
# 1.38 ms: small tiles keep the backward's 2w − 1 + w live tiles in registers).
FWD_BLOCKS = ConvBlocks(block_l=32, block_c=128, sub_tiles=1, num_warps=4)
BWD_BLOCKS = ConvBlocks(block_l=8, block_c=64, sub_tiles=16, num_warps=4)


def block_channels(channels: int, largest: int = 128) -> int:
  """The largest power of two <= ``largest`` dividing ``channels`` (0 below MIN_BLOCK_C)."""
  block = largest
  while block >= MIN_BLOCK_C and channels % block:
    block //= 2
  return block if block >= MIN_BLOCK_C else 0


def check_supported(x: jax.Array, weight: jax.Array) -> str:
  """'' when the kernels take these shapes and dtypes, else why not (the XLA form takes all).

  x: (b, l, c) (or wider, the conv reading some of its columns); weight: (c, w).
  """
  if x.ndim != 3:
    return f"the kernel takes x of rank 3 (batch, length, dim), got rank {x.ndim}"
  for name, a in (("x", x), ("weight", weight)):
    if jnp.dtype(a.dtype) not in _DTYPES:
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  if not block_channels(weight.shape[0]):
    return (f"the kernel needs a channel count divisible by {MIN_BLOCK_C}, got "
            f"{weight.shape[0]}")
  return ""


def _sigmoid(u: jax.Array, fast: bool) -> jax.Array:
  """σ(u) = 1 / (1 + exp(−u)); ``fast``: the reciprocal as one rcp.approx.ftz.f32 (error
  <= 1 ulp) instead of an IEEE division (about ten instructions). Compiled kernels only: the
  interpreter has no PTX."""
  denom = 1.0 + jnp.exp(-u)
  if not fast:
    return 1.0 / denom
  return pl_triton.elementwise_inline_asm(
      "rcp.approx.ftz.f32 $0, $1;", args=[denom], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(denom.shape, jnp.float32)])[0]


def _rows(start, size: int, length: int, *, clamp: bool = True):
  """(indices (size, 1), in-range mask (size, 1)) of positions start .. start + size - 1.

  Loads clamp the indices into [0, length). Stores must not (``clamp=False``): two lanes of
  one index, one masked, race in the interpreter's scatter; out-of-range ones are dropped.
  """
  pos = start + jnp.arange(size, dtype=jnp.int32)
  valid = (pos >= 0) & (pos < length)
  return (jnp.clip(pos, 0, length - 1) if clamp else pos)[:, None], valid[:, None]


def _load_rows(ref, start, size: int, length: int, cols) -> jax.Array:
  """ref[start : start + size, cols] as float32, zero outside [0, length)."""
  idx, valid = _rows(start, size, length)
  return pl_triton.load(ref.at[idx, cols], mask=valid, other=0.0).astype(jnp.float32)


def _forward_kernel(*refs, length: int, width: int, block_l: int, block_c: int,
                    has_bias: bool, silu: bool, fast: bool, x_offset: int):
  x_ref, w_ref = refs[:2]
  b_ref = refs[2] if has_bias else None
  y_ref = refs[-1]
  t0, c0 = pl.program_id(1) * block_l, pl.program_id(2) * block_c
  cols = (c0 + jnp.arange(block_c, dtype=jnp.int32))[None, :]
  x_cols = cols + x_offset
  chans = pl.ds(c0, block_c)
  acc = jnp.zeros((block_l, block_c), jnp.float32)
  if has_bias:
    acc += b_ref[chans].astype(jnp.float32)[None, :]
  for k in range(width):
    tap = w_ref[chans, k].astype(jnp.float32)[None, :]
    acc += tap * _load_rows(x_ref, t0 - (width - 1) + k, block_l, length, x_cols)
  if silu:
    acc = acc * _sigmoid(acc, fast)
  idx, valid = _rows(t0, block_l, length, clamp=False)
  pl_triton.store(y_ref.at[idx, cols], acc.astype(y_ref.dtype), mask=valid)


def _check_columns(name: str, x: jax.Array, offset: int, channels: int) -> None:
  if not 0 <= offset <= x.shape[2] - channels:
    raise ValueError(f"{name} columns [{offset}, {offset + channels}) are not inside its "
                     f"{x.shape[2]} columns")


def _checked_sizes(x: jax.Array, weight: jax.Array, x_offset: int) -> tuple[int, int, int, int]:
  """(b, l, c, w) of the kernels' arguments, or ValueError saying what they do not take."""
  why = check_supported(x, weight)
  if why:
    raise ValueError(why)
  channels, width = weight.shape
  _check_columns("x", x, x_offset, channels)
  return x.shape[0], x.shape[1], channels, width


@functools.partial(jax.jit, static_argnames=("silu", "interpret", "blocks", "x_offset"))
def causal_conv1d_fwd_pallas(x: jax.Array, weight: jax.Array, bias: jax.Array | None, *,
                             silu: bool, interpret: bool = False,
                             blocks: ConvBlocks = FWD_BLOCKS, x_offset: int = 0) -> jax.Array:
  """y = act(causal_conv(x)), the module docstring's forward.

  Args:
    x: (b, l, c), or (b, l, c') holding the conv's input in columns [x_offset, x_offset + c)
      (read in place: e.g. Mamba-2's in_proj output). weight: (c, w). bias: optional (c,).
    silu: silu activation (else none).
    interpret: run in the Pallas interpreter (CPU).
    blocks: tile sizes and warps (``sub_tiles`` unused).
    x_offset: the first of x's columns the conv reads.

  Returns:
    y (b, l, c) in x's dtype.
  """
  batch, length, channels, width = _checked_sizes(x, weight, x_offset)
  block_c = block_channels(channels, blocks.block_c)
  block_l = min(blocks.block_l, pl.next_power_of_2(length))
  kernel = functools.partial(_forward_kernel, length=length, width=width, block_l=block_l,
                             block_c=block_c, has_bias=bias is not None, silu=silu,
                             fast=not interpret, x_offset=x_offset)
  row = pl.BlockSpec((None, length, channels), lambda bi, li, ci: (bi, 0, 0))
  x_row = pl.BlockSpec((None, length, x.shape[2]), lambda bi, li, ci: (bi, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda bi, li, ci: (0,) * len(shape))
  in_specs, args = [x_row, whole(weight.shape)], [x, weight]
  if bias is not None:
    in_specs.append(whole(bias.shape))
    args.append(bias)
  return pl.pallas_call(
      kernel,
      grid=(batch, pl.cdiv(length, block_l), channels // block_c),
      in_specs=in_specs,
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct((batch, length, channels), x.dtype),
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="causal_conv1d_fwd",
  )(*args)


def _backward_kernel(*refs, length: int, width: int, block_l: int, sub_tiles: int,
                     block_c: int, has_bias: bool, silu: bool, fast: bool, x_offset: int,
                     dx_offset: int, into: bool):
  x_ref, w_ref = refs[:2]
  b_ref = refs[2] if has_bias else None
  dx_ref, dw_ref, db_ref = refs[-3:]
  dy_ref = refs[-5] if into else refs[-4]  # (the buffer dx goes into, aliased, is refs[-4])
  run, c0 = pl.program_id(1), pl.program_id(2) * block_c
  cols = (c0 + jnp.arange(block_c, dtype=jnp.int32))[None, :]
  x_cols, dx_cols = cols + x_offset, cols + dx_offset
  chans = pl.ds(c0, block_c)
  taps = [w_ref[chans, k].astype(jnp.float32)[None, :] for k in range(width)]
  bias = b_ref[chans].astype(jnp.float32)[None, :] if has_bias else 0.0

  def tile(i, carry):
    dw, db = carry
    t0 = (run * sub_tiles + i) * block_l
    # dpre at the shifts j = 0 .. w - 1 (positions t0 + j ...), zero past the end; dx
    # gathers weight[w - 1 - j] · dpre_j.
    if silu:
      xs = {s: _load_rows(x_ref, t0 + s, block_l, length, x_cols)
            for s in range(-(width - 1), width)}
    dx = own = None
    for j in range(width):
      g = _load_rows(dy_ref, t0 + j, block_l, length, cols)
      if silu:
        pre = bias + sum(taps[k] * xs[j - (width - 1) + k] for k in range(width))
        sig = _sigmoid(pre, fast)
        g = g * (sig * (1.0 + pre * (1.0 - sig)))
      own = g if j == 0 else own
      dx = taps[width - 1 - j] * g if j == 0 else dx + taps[width - 1 - j] * g
    idx, valid = _rows(t0, block_l, length, clamp=False)
    pl_triton.store(dx_ref.at[idx, dx_cols], dx.astype(dx_ref.dtype), mask=valid)
    if not silu:
      xs = {s: _load_rows(x_ref, t0 + s, block_l, length, x_cols)
            for s in range(-(width - 1), 1)}
    # Tile-shaped accumulators: one reduction over positions per program, not per tile.
    dw = tuple(dw[k] + own * xs[k - (width - 1)] for k in range(width))
    return dw, db + own

  zeros = jnp.zeros((block_l, block_c), jnp.float32)
  dw, db = jax.lax.fori_loop(0, sub_tiles, tile, ((zeros,) * width, zeros))
  for k in range(width):
    dw_ref[k, chans] = jnp.sum(dw[k], axis=0)
  db_ref[chans] = jnp.sum(db, axis=0)


@functools.partial(jax.jit, static_argnames=("silu", "interpret", "blocks", "x_offset",
                                             "dx_offset"),
                   donate_argnames=("dx_into",))
def causal_conv1d_bwd_pallas(x: jax.Array, weight: jax.Array, bias: jax.Array | None,
                             dy: jax.Array, *, silu: bool, interpret: bool = False,
                             blocks: ConvBlocks = BWD_BLOCKS, x_offset: int = 0,
                             dx_into: jax.Array | None = None, dx_offset: int = 0
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The module docstring's backward.

  Args:
    x: (b, l, c), or (b, l, c') with the forward's input in columns [x_offset, x_offset + c).
    weight: (c, w). bias: optional (c,).
    dy: (b, l, c) cotangent of y.
    silu: the forward's activation.
    interpret: run in the Pallas interpreter (CPU).
    blocks: tile sizes, tiles per program and warps.
    x_offset: as in the forward.
    dx_into: optional (b, l, c'') buffer that dx is written into, in place, at columns
      [dx_offset, dx_offset + c); its other columns are left as they are (e.g. Mamba-2's
      in_proj gradient, assembled column block by column block).

  Returns:
    (dx (b, l, c) in x's dtype, or ``dx_into`` with dx in its columns; dweight (c, w)
    float32; dbias (c,) float32).
  """
  batch, length, channels, width = _checked_sizes(x, weight, x_offset)
  if dy.shape != (batch, length, channels):
    raise ValueError(f"dy has shape {dy.shape}; expected {(batch, length, channels)}")
  if dx_into is not None:
    if dx_into.shape[:2] != (batch, length):
      raise ValueError(f"dx_into has shape {dx_into.shape}; expected ({batch}, {length}, ...)")
    _check_columns("dx_into", dx_into, dx_offset, channels)
  elif dx_offset:
    raise ValueError("dx_offset needs dx_into")
  block_c = block_channels(channels, blocks.block_c)
  block_l = min(blocks.block_l, pl.next_power_of_2(length))
  sub_tiles = min(blocks.sub_tiles, pl.cdiv(length, block_l))
  runs = pl.cdiv(length, block_l * sub_tiles)
  kernel = functools.partial(_backward_kernel, length=length, width=width, block_l=block_l,
                             sub_tiles=sub_tiles, block_c=block_c,
                             has_bias=bias is not None, silu=silu, fast=not interpret,
                             x_offset=x_offset, dx_offset=dx_offset,
                             into=dx_into is not None)
  row = lambda cols: pl.BlockSpec((None, length, cols), lambda bi, ri, ci: (bi, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda bi, ri, ci: (0,) * len(shape))
  in_specs, args = [row(x.shape[2]), whole(weight.shape)], [x, weight]
  if bias is not None:
    in_specs.append(whole(bias.shape))
    args.append(bias)
  in_specs.append(row(channels))
  args.append(dy)
  dx_shape = jax.ShapeDtypeStruct((batch, length, channels), x.dtype)
  aliases = {}
  if dx_into is not None:
    in_specs.append(row(dx_into.shape[2]))
    args.append(dx_into)
    dx_shape = jax.ShapeDtypeStruct(dx_into.shape, dx_into.dtype)
    aliases = {len(args) - 1: 0}
  dx, dw, db = pl.pallas_call(
      kernel,
      grid=(batch, runs, channels // block_c),
      in_specs=in_specs,
      out_specs=[row(dx_shape.shape[2]),
                 pl.BlockSpec((None, None, width, channels),
                              lambda bi, ri, ci: (bi, ri, 0, 0)),
                 pl.BlockSpec((None, None, channels), lambda bi, ri, ci: (bi, ri, 0))],
      out_shape=[dx_shape,
                 jax.ShapeDtypeStruct((batch, runs, width, channels), jnp.float32),
                 jax.ShapeDtypeStruct((batch, runs, channels), jnp.float32)],
      input_output_aliases=aliases,
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="causal_conv1d_bwd",
  )(*args)
  return dx, jnp.sum(dw, axis=(0, 1)).T, jnp.sum(db, axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def causal_conv1d_pallas(x: jax.Array, weight: jax.Array, bias: jax.Array | None, silu: bool,
                         interpret: bool = False) -> jax.Array:
  """act(causal_conv(x)) with the kernels' backward: x (b, l, c), weight (c, w), bias (c,) or
  None -> (b, l, c) in x's dtype. Gradients for x, weight and bias in their dtypes."""
  return causal_conv1d_fwd_pallas(x, weight, bias, silu=silu, interpret=interpret)


def _vjp_forward(x, weight, bias, silu, interpret):
  y = causal_conv1d_fwd_pallas(x, weight, bias, silu=silu, interpret=interpret)
  return y, (x, weight, bias)


def _vjp_backward(silu, interpret, residuals, dy):
  x, weight, bias = residuals
  dx, dw, db = causal_conv1d_bwd_pallas(x, weight, bias, dy.astype(x.dtype), silu=silu,
                                        interpret=interpret)
  return dx, dw.astype(weight.dtype), None if bias is None else db.astype(bias.dtype)


causal_conv1d_pallas.defvjp(_vjp_forward, _vjp_backward)
