"""Block sizes of the Pallas GPU SSD (Mamba-2) kernels, and the per-device table of tuned ones.

Every SSD kernel works on one chunk of ``chunk_size`` (q) positions of one head; inside the chunk
it walks over row blocks (``block_m``) and inner blocks (``block_k``) of positions. ``block_pn``
tiles the flattened (p n) state in the sequential state-passing kernel. ``num_warps`` and
``num_stages`` are Triton's launch parameters for the chunk-parallel kernels.

The tuned table lives in ``ssd_block_table.py`` (written by ``scripts/sweep_ssd_blocks.py``),
keyed by compute capability ("sm90"), state size n and head dim p.
"""

from __future__ import annotations

import dataclasses

import jax


def _is_power_of_two(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True)
class SSDBlockSizes:
  """Tile sizes of the SSD kernels (all powers of two, at least 16 where they feed a matmul).

  Attributes:
    block_m: rows (output positions t) per program of the chunk-scan and backward kernels.
    block_k: positions per step of the inner loops over the chunk.
    block_pn: elements of the flattened (p n) state per program of the state-passing kernels.
    num_warps: Triton warps per program of the chunk-parallel kernels.
    num_stages: Triton software-pipelining depth of the chunk-parallel kernels.
    num_warps_bwd: Triton warps per program of the backward dx / dB / dC kernels.
  """
  block_m: int = 64
  block_k: int = 64
  block_pn: int = 1024
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4

  def __post_init__(self):
    for name in ("block_m", "block_k"):
      v = getattr(self, name)
      if not _is_power_of_two(v) or v < 16:
        raise ValueError(f"{name}={v} must be a power of two >= 16")
    if not _is_power_of_two(self.block_pn):
      raise ValueError(f"block_pn={self.block_pn} must be a power of two")
    for name in ("num_warps", "num_warps_bwd"):
      v = getattr(self, name)
      if v not in (1, 2, 4, 8, 16):
        raise ValueError(f"{name}={v} must be one of 1, 2, 4, 8, 16")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")

  def check(self, chunk_size: int, head_dim: int, state: int) -> None:
    """Raises unless these blocks tile a chunk of ``chunk_size`` and a (p, n) state."""
    if not _is_power_of_two(chunk_size) or chunk_size < 16:
      raise ValueError(f"{chunk_size=} must be a power of two >= 16")
    for name in ("block_m", "block_k"):
      v = getattr(self, name)
      if chunk_size % v:
        raise ValueError(f"{chunk_size=} must be a multiple of {name}={v}")
    if not _is_power_of_two(head_dim) or head_dim < 16:
      raise ValueError(f"head_dim p={head_dim} must be a power of two >= 16")
    if not _is_power_of_two(state) or state < 16:
      raise ValueError(f"state size n={state} must be a power of two >= 16")


def device_key() -> str:
  """"sm90" etc. for the first GPU, "cpu" when there is none (interpret mode)."""
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if dev.platform != "gpu" or not cc:
    return "cpu"
  major, minor = str(cc).split(".")[:2]
  return f"sm{major}{minor}"


def tuned_block_sizes(head_dim: int, state: int, chunk_size: int) -> SSDBlockSizes:
  """The swept block sizes for this device and (p, n, q), else the defaults clipped to q, p·n."""
  from pallas_kernels.gpu import ssd_block_table  # the table is data written by the sweep
  entry = ssd_block_table.TABLE.get((device_key(), state, head_dim, chunk_size))
  if entry is not None:
    return SSDBlockSizes(**entry)
  default = SSDBlockSizes()
  return dataclasses.replace(default, block_m=min(default.block_m, chunk_size),
                             block_k=min(default.block_k, chunk_size),
                             block_pn=min(default.block_pn, head_dim * state))
