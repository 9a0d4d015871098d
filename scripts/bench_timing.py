"""Timing and roofline constants shared by the kernel benchmarks (scripts/bench_*.py).

The constants are the H100 ceilings measured in ../shared/PERF.md: device copy ≈ 3.0 TB/s
(read + write), bf16 matmul ≈ 740 TFLOP/s, and the special-function unit's exp rate (132 SMs ×
16 per clock × 1.98 GHz), which bounds the selective scan.
"""

from __future__ import annotations

import json
import os
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


# Dense bf16 peak of an H100 SXM (the datasheet's 989 TFLOP/s without sparsity): the MFU
# denominator of the training benchmarks, as PERF.md and mamba_jax.training.metrics use it.
PEAK_BF16_FLOPS_PER_S = 989e12


def environment() -> dict[str, Any]:
  """Where a benchmark ran: date (UTC), host, CPUs and their load, GPU and driver, versions.

  Reads ``nvidia-smi`` and the installed packages' metadata only (it does not import jax or
  torch, so a driver process does not take the GPU). Missing pieces are None.
  """
  import datetime
  import importlib.metadata
  import platform
  import subprocess
  versions = {}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "torch", "triton",
               "numpy"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  gpu = driver = None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip().splitlines()
    if out:
      gpu, driver = (s.strip() for s in out[0].split(",", 1))
  except (OSError, subprocess.SubprocessError):
    pass
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              host=platform.node(), cpu_count=os.cpu_count(),
              load_average=[round(v, 2) for v in os.getloadavg()], gpu=gpu, driver=driver,
              versions=versions)


def peak_device_bytes() -> int | None:
  """The first JAX device's ``peak_bytes_in_use`` (process-wide, monotone); None on CPU."""
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def write_json(path: str, data: Any) -> None:
  """Writes ``data`` to ``path`` atomically (a reader never sees half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, path)


def parse_auto_as(text: str) -> dict[str, str]:
  """"op=impl,op=impl" -> {op: impl}, the keyword arguments of
  ``mamba_jax.ops.impl.resolve_auto_as`` (what impl="auto" of each named op resolves to)."""
  choices = {}
  for item in filter(None, text.split(",")):
    op, sep, impl = item.partition("=")
    if not sep or not op or not impl:
      raise ValueError(f"--auto_as takes op=impl pairs separated by commas, got {item!r} "
                       f"in {text!r}")
    choices[op] = impl
  return choices
