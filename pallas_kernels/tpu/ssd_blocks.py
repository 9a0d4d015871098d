"""Block sizes of the Pallas TPU SSD (Mamba-2) kernels and their VMEM budget.

Both SSD kernels (``ssd_fwd``, ``ssd_bwd``) run on the grid (b, h / r, c): one program per
batch row, block of ``heads_per_block`` heads of one group, and chunk of ``chunk_size`` (q)
positions. The chunk axis is last and "arbitrary" (sequential, it carries the (p, n) state in
VMEM scratch); batch and head blocks are "parallel" (split over the two TensorCores of a
megacore chip, v4 / v5p).

VMEM budget. We assume a v5e / v6e TensorCore: 128 MiB of VMEM of which 16 MiB (v5e) / 32 MiB
(v6e) are the scoped default; the kernels ask for ``vmem_limit_bytes`` (32 MiB by default, which
v5e, v5p and v6e all grant). ``vmem_bytes`` counts every buffer of one grid step as Mosaic lays
it out: each block padded to (8, 128) tiles in 32-bit ((16, 128) for 16-bit dtypes), inputs and
outputs double-buffered by the pipeline, scratch (the carried state, and in the backward the
(q, q) head-summed d(C Bᵀ)) once, plus the (q, q) float32 temporaries of the
chunk's quadratic form (the heads of a block are processed one after another, so those are
counted once). The largest supported case, q = 256, p = 128, n = 256, float32 inputs, 8 heads per
block, needs 16.6 MiB in the forward and 24.0 MiB in the backward, within the 32 MiB limit; the
Mamba-2 shape (q = 256, p = 64, n = 128, bf16, 8 heads per block) needs 7.3 / 11.7 MiB, within
even v5e's 16 MiB default. ``SSDTpuBlockSizes.check`` raises when a configuration does not fit,
and ``default_block_sizes`` picks the most heads per block (at most 8) that fit.

MXU shapes. The chunk's matmuls are C Bᵀ (q, n)·(n, q), the masked product (q, q)·(q, p), the
state read C·hᵀ (q, n)·(n, p) and the state update (q, p)ᵀ·(q, n). With q = 256 and n ≥ 128
they fill the 128 × 128 MXU of v5e and the 256 × 256 MXU of v6e in the q dimensions; p = 64
half-fills a 128-wide output (the heads of a block are looped, not concatenated). Several heads
share one program because all heads of a group read the same B and C: they are fetched from HBM
and C Bᵀ is computed once per head block instead of once per head.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

# Rows of the per-position vector block (b, h, c, VEC_ROWS, q) fed to both kernels.
CS, DT, W_IN, W_OUT, SEG = range(5)
VEC_ROWS = 5
# Rows of the backward's per-position gradient block (b, h, c, DVEC_ROWS, q).
DCS, DDT, DW_IN, DW_OUT = range(4)
DVEC_ROWS = 4

MIB = 1 << 20


def _tile_bytes(shape: tuple[int, ...], itemsize: int) -> int:
  """Bytes of an array in VMEM: the last two dims padded to Mosaic's native tiles."""
  *lead, rows, cols = shape
  sublanes = 8 * (4 // itemsize)  # 8 rows of 32-bit, 16 of 16-bit values per tile
  rows = -(-rows // sublanes) * sublanes
  cols = -(-cols // 128) * 128
  count = rows * cols * itemsize
  for d in lead:
    count *= d
  return count


@dataclasses.dataclass(frozen=True)
class SSDTpuBlockSizes:
  """Block sizes of the TPU SSD kernels.

  Attributes:
    chunk_size: q, positions per chunk (a multiple of 16; 64-256 are the sizes meant for TPU,
      smaller ones serve the CPU interpreter's tests).
    heads_per_block: heads per program; must divide h / g so that a block reads one group.
    vmem_limit_bytes: the scoped VMEM the kernels request from Mosaic.
  """
  chunk_size: int = 256
  heads_per_block: int = 1
  vmem_limit_bytes: int = 32 * MIB

  def __post_init__(self):
    if self.chunk_size <= 0 or self.chunk_size % 16:
      raise ValueError(f"chunk_size={self.chunk_size} must be a positive multiple of 16")
    if self.heads_per_block <= 0:
      raise ValueError(f"heads_per_block={self.heads_per_block} must be positive")
    if not 4 * MIB <= self.vmem_limit_bytes <= 128 * MIB:
      raise ValueError(f"vmem_limit_bytes={self.vmem_limit_bytes} must be in [4 MiB, 128 MiB]")

  def vmem_bytes(self, head_dim: int, d_state: int, dtype, backward: bool) -> int:
    """VMEM bytes of one grid step of the forward (or backward) kernel, with every option on."""
    q, r, p, n = self.chunk_size, self.heads_per_block, head_dim, d_state
    s = jnp.dtype(dtype).itemsize
    f32 = 4
    if backward:
      pipelined = (4 * _tile_bytes((r, q, p), s)  # x, z, dout in; dx, dz out counted below
                   + _tile_bytes((r, q, p), s)
                   + 2 * _tile_bytes((q, n), s)  # B, C
                   + 2 * _tile_bytes((q, n), f32)  # dB, dC
                   + _tile_bytes((r, VEC_ROWS, q), f32) + _tile_bytes((r, DVEC_ROWS, q), f32)
                   + 2 * _tile_bytes((r, 1, p), f32)  # D, dD
                   + 3 * _tile_bytes((r, p, n), f32))  # entering states, dfinal, dinit
      scratch = _tile_bytes((r, p, n), f32) + _tile_bytes((q, q), f32)
      temporaries = 9 * _tile_bytes((q, q), f32) + 6 * _tile_bytes((q, p), f32) \
          + 4 * _tile_bytes((q, n), f32) + 3 * _tile_bytes((p, n), f32)
    else:
      pipelined = (3 * _tile_bytes((r, q, p), s)  # x, z in; y out
                   + 2 * _tile_bytes((q, n), s)  # B, C
                   + _tile_bytes((r, VEC_ROWS, q), f32)
                   + _tile_bytes((r, 1, p), f32)  # D
                   + 3 * _tile_bytes((r, p, n), f32))  # initial, chunk and final states
      scratch = _tile_bytes((r, p, n), f32)
      temporaries = 6 * _tile_bytes((q, q), f32) + 3 * _tile_bytes((q, p), f32) \
          + _tile_bytes((q, n), f32) + 2 * _tile_bytes((p, n), f32)
    return 2 * pipelined + scratch + temporaries

  def check(self, heads: int, groups: int, head_dim: int, d_state: int, dtype) -> None:
    """Raises ValueError unless these blocks tile the heads and fit ``vmem_limit_bytes``."""
    per_group = heads // groups
    if per_group % self.heads_per_block:
      raise ValueError(f"heads_per_block={self.heads_per_block} must divide heads per group "
                       f"{per_group} (heads={heads}, groups={groups})")
    need = max(self.vmem_bytes(head_dim, d_state, dtype, backward)
               for backward in (False, True))
    if need > self.vmem_limit_bytes:
      raise ValueError(
          f"SSD TPU blocks {self} need {need / MIB:.1f} MiB of VMEM for head_dim={head_dim}, "
          f"d_state={d_state}, {jnp.dtype(dtype).name}; more than vmem_limit_bytes="
          f"{self.vmem_limit_bytes / MIB:.0f} MiB: use fewer heads_per_block or a smaller chunk")

  def compiler_params(self) -> pltpu.CompilerParams:
    """Mosaic parameters: (batch, head block) parallel, chunks arbitrary, the VMEM limit."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=self.vmem_limit_bytes)


def default_block_sizes(chunk_size: int, heads: int, groups: int, head_dim: int, d_state: int,
                        dtype) -> SSDTpuBlockSizes:
  """The most heads per block (at most 8, dividing h / g) whose kernels fit 32 MiB of VMEM."""
  per_group = heads // groups
  for r in range(min(per_group, 8), 0, -1):
    if per_group % r:
      continue
    blocks = SSDTpuBlockSizes(chunk_size=chunk_size, heads_per_block=r)
    if all(blocks.vmem_bytes(head_dim, d_state, dtype, bw) <= blocks.vmem_limit_bytes
           for bw in (False, True)):
      return blocks
  blocks = SSDTpuBlockSizes(chunk_size=chunk_size, heads_per_block=1)
  blocks.check(heads, groups, head_dim, d_state, dtype)
  return blocks
