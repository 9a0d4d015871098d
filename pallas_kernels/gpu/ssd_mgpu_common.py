"""Shared pieces of the Mosaic GPU (Hopper) SSD kernels: SMEM buffers, layouts, launch options.

The kernels (``ssd_mgpu_chunk_state``, ``ssd_mgpu_chunk_scan``) are written against
``jax.experimental.pallas.mosaic_gpu`` (``plgpu.kernel``, ``plgpu.wgmma``, TMA copies). Their
matmul operands live in shared memory tiled (8, 128 bytes) and 128-byte swizzled, as wgmma
reads them; Mosaic GPU's interpreter (CPU) takes only untiled buffers, so ``interpret=True``
allocates the same buffers without the transforms (the arithmetic is identical).

Every kernel works on row blocks of ``ROWS`` = 64 positions: one warpgroup's wgmma tile.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

ROWS = 64
MATMUL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Register layouts of a (ROWS, cols) wgmma accumulator and of vectors broadcast along it.
TILE = plgpu.Layout.WGMMA
ROW_VECTOR = plgpu.Layout.WGMMA.reduce(1)   # one value per row t (broadcast along columns)
COL_VECTOR = plgpu.Layout.WGMMA.reduce(0)   # one value per column s (broadcast along rows)


def smem(shape: tuple[int, ...], dtype, interpret: bool):
  """A shared-memory buffer; 2-D+ ones tiled and swizzled for wgmma / TMA unless interpreted."""
  dtype = jnp.dtype(dtype)
  if interpret or len(shape) < 2:
    return plgpu.SMEM(shape, dtype)
  swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def launch_options(interpret: bool) -> dict:
  """Keyword arguments of ``plgpu.kernel`` for compiled or interpreted runs."""
  if interpret:
    return dict(interpret=plgpu.InterpretGPUParams())
  return dict(compiler_params=plgpu.CompilerParams())


def wgmma_accumulate(acc, a, b, interpret: bool, a_smem=None):
  """acc + a @ b on the tensor cores: acc a float32 (m, k) array in the TILE layout, a a
  register array or SMEM ref, b an SMEM ref. Compiled, the registers become the accumulator
  (``ACC.init``, as jax's attention_mgpu does). The interpreter has no rule for that form and
  reads both operands from SMEM: it adds a fresh product instead (the same sum), staging a
  register operand through ``a_smem``."""
  if interpret:
    if a_smem is not None:
      a_smem[...] = a
      a = a_smem
    return acc + wgmma_product(a, b, acc.shape)
  return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def wgmma_product(a, b, shape: tuple[int, int]):
  """a @ b -> float32 (m, n) array in the TILE layout (a fresh accumulator)."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))
