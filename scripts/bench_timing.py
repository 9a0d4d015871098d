"""Timing and roofline constants shared by the kernel benchmarks (scripts/bench_*.py).

The constants are the H100 ceilings measured in ../shared/PERF.md: device copy ≈ 3.0 TB/s
(read + write), bf16 matmul ≈ 740 TFLOP/s, and the special-function unit's exp rate (132 SMs ×
16 per clock × 1.98 GHz), which bounds the selective scan.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOPS_PER_S = 740e12
EXP_PER_S = 132 * 16 * 1.98e9


def time_ms(fn: Callable[[], Any], sync: Callable[[Any], None], reps: int, inner: int,
            warmup: int = 3) -> float:
  """Median over ``reps`` of the per-call ms of ``inner`` back-to-back calls, after warm-up.

  ``sync`` waits for a call's result (``jax.block_until_ready``, ``torch.cuda.synchronize``).
  """
  for _ in range(warmup):
    sync(fn())
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn()
    sync(out)
    samples.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(samples)
