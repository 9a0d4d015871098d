"""One decoding step of the depthwise causal conv as a Pallas GPU kernel (Triton lowering).

The kernel form of ``mamba_jax.ops.causal_conv1d.causal_conv1d_update`` (Mamba §3.4, the conv's
recurrent form), for a state that holds exactly the last w − 1 inputs (s = w − 1, what the
models keep), per channel c:

  y[c]         = act(bias[c] + Σ_{k<w−1} weight[c, k] · state[c, k] + weight[c, w−1] · x[c])
  new_state[c] = [state[c, 1:], x[c]]

with act = silu or identity; the sum runs in float32 and y is rounded to x's dtype, the new
state to the state's dtype, as in the reference. ``conv_window`` is the per-channel-block body,
shared with the fused Mamba-2 decoding kernel (``ssd_decode_step``), which convolves its own
channels in the same way.

One program per (batch row, block of ``block_c`` channels). At batch 1 the XLA form is two
kernels (the window's concatenation and the weighted sum); this is one. The state is updated in
place (``input_output_aliases``): a decoding loop's carried buffer is neither copied nor
reallocated (in mamba-1.4b's batch-1 loop on an H100 the copies took 117 µs per token, 48
kernels). In place is safe because no thread overwrites a tap that another warp has yet to
read: the window's columns and the stored columns are (block_c,) vectors of one layout, so a
channel's taps are read and rewritten by the threads holding that channel, and
``num_warps_for`` gives a block at least 32 channels per warp (each channel in one thread) or
one warp (a block under 32 channels, repeated over its lanes, which all finish their loads
before the y they feed is stored, and the state after it).

Backend: Pallas with the Triton lowering; ``interpret=True`` runs it on CPU.

Shape legend: b batch, c channels, w conv width, s = w − 1 state length.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

MAX_BLOCK_C = 256  # channels per program (the largest power of two <= it dividing c)


def conv_window(x, state_ref, weight_ref, bias_ref, start, count: int, width: int,
                silu: bool):
  """The conv step of channels [start, start + count), their inputs ``x`` already loaded.

  Args:
    x: (count,) this position's inputs of those channels (the callers read them from
      different layouts: a (b, c) row, Mamba-1's interleaved in_proj pairs, Mamba-2's in_proj
      row).
    state_ref: (c, w − 1) the previous w − 1 inputs, oldest first.
    weight_ref: (c, w); bias_ref: (c,) or None.
    start: first channel (may be traced); count: a power of two.
    width: w >= 2.
    silu: apply silu to the sum.

  Returns:
    (y (count,) float32 before rounding, the state's columns [state[:, k] for k < w − 1],
    each (count,) in the state's dtype).
  """
  rows = pl.ds(start, count)
  cols = [state_ref[rows, k] for k in range(width - 1)]
  acc = weight_ref[rows, width - 1].astype(jnp.float32) * x.astype(jnp.float32)
  for k, col in enumerate(cols):
    acc += weight_ref[rows, k].astype(jnp.float32) * col.astype(jnp.float32)
  if bias_ref is not None:
    acc += bias_ref[rows].astype(jnp.float32)
  if silu:
    acc = acc / (1.0 + jnp.exp(-acc))
  return acc, cols


def store_shifted_state(out_ref, start, count: int, x, cols) -> None:
  """Writes [cols[1:], x] (the state after this position) to out_ref[start:start+count]."""
  rows = pl.ds(start, count)
  for k, col in enumerate(cols[1:] + [x]):
    out_ref[rows, k] = col.astype(out_ref.dtype)


def block_channels(channels: int) -> int:
  """The largest power of two <= MAX_BLOCK_C dividing ``channels`` (1 for an odd count)."""
  block = MAX_BLOCK_C
  while channels % block:
    block //= 2
  return block


def num_warps_for(block: int) -> int:
  """Warps for a block of ``block`` channels: up to 4, at most one per 32 channels (at least
  one), so that no channel is held by threads of two warps (the in-place update above)."""
  return max(1, min(4, block // 32))


def check_supported(x: jax.Array, conv_state: jax.Array, weight: jax.Array) -> str:
  """'' when the kernel takes these shapes, else why not (the XLA form takes every shape)."""
  width = weight.shape[1]
  if width < 2:
    return f"the kernel needs a conv width >= 2, got {width}"
  if conv_state.shape[2] != width - 1:
    return (f"the kernel needs conv_state of length width - 1 = {width - 1}, got "
            f"{conv_state.shape[2]}")
  for name, a in (("x", x), ("conv_state", conv_state), ("weight", weight)):
    if jnp.dtype(a.dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
      return f"the kernel takes float32/bfloat16/float16 {name}, got {a.dtype}"
  return ""


@functools.partial(jax.jit, static_argnames=("silu", "out_rows", "interpret"))
def causal_conv1d_update_pallas(x: jax.Array, conv_state: jax.Array, weight: jax.Array,
                                bias: jax.Array | None, *, silu: bool,
                                out_rows: int | None = None,
                                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The module docstring's step; validated shapes (``causal_conv1d_update``'s checks).

  Args:
    x: (b, c), or (b, c, 2) pairs whose [..., 0] are the inputs (Mamba-1's in_proj output,
      whose x and z channels alternate, read in place).
    conv_state: (b, c, w − 1). weight: (c, w). bias: optional (c,).
    silu: silu activation (else none).
    out_rows: rows of y, >= b (default b); rows past b are zeros. Mamba-1's decoding step
      asks for 2 at batch 1 so that x_proj's product is a two-row GEMM without a pad kernel
      (``mamba_jax.nn.linear``).
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (y (out_rows, c) in x's dtype, new_state (b, c, w − 1) in conv_state's dtype).
  """
  batch, channels = x.shape[:2]
  pairs = x.ndim == 3
  out_rows = out_rows or batch
  width = weight.shape[1]
  block = block_channels(channels)

  def kernel(*refs):
    x_ref, state_ref, weight_ref = refs[:3]
    bias_ref = refs[3] if bias is not None else None
    y_ref, new_state_ref = refs[-2:]
    bi, start = pl.program_id(0), pl.program_id(1) * block
    rows = pl.ds(start, block)
    xv = x_ref[rows, 0] if pairs else x_ref[rows]
    acc, cols = conv_window(xv, state_ref, weight_ref, bias_ref, start, block, width, silu)
    y_ref[bi, rows] = acc.astype(y_ref.dtype)
    store_shifted_state(new_state_ref, start, block, xv, cols)
    for extra in range(batch, out_rows):  # zero rows, written once (by batch row 0)
      @pl.when(bi == 0)
      def _():
        y_ref[extra, rows] = jnp.zeros((block,), y_ref.dtype)

  x_spec = pl.BlockSpec((None, channels, 2) if pairs else (None, channels),
                        (lambda bi, j: (bi, 0, 0)) if pairs else (lambda bi, j: (bi, 0)))
  state_row = pl.BlockSpec((None, channels, width - 1), lambda bi, j: (bi, 0, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda bi, j: (0,) * len(shape))
  in_specs = [x_spec, state_row, whole(weight.shape)]
  args = [x, conv_state, weight]
  if bias is not None:
    in_specs.append(whole(bias.shape))
    args.append(bias)
  return pl.pallas_call(
      kernel,
      grid=(batch, channels // block),
      in_specs=in_specs,
      out_specs=[whole((out_rows, channels)), state_row],
      out_shape=[jax.ShapeDtypeStruct((out_rows, channels), x.dtype),
                 jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)],
      input_output_aliases={1: 1},  # the state, updated in place
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps_for(block), num_stages=1),
      interpret=interpret,
      name="causal_conv1d_update",
  )(*args)
