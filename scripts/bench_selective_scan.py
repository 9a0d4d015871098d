"""Benchmark of Mamba-1 selective scan (S6) implementations side by side on one GPU, in one process.

Compares, at d_state 16, a fixed token count (batch x length), for each d_inner:
  pallas       ``pallas_kernels.gpu.selective_scan.selective_scan_pallas_gpu`` (fused Pallas
               kernels, Triton lowering)
  pallas_mosaic  the same with ``backend="mosaic"``: the Mosaic GPU (Hopper) forward and
               backward (``selective_scan_mgpu``, ``selective_scan_mgpu_bwd``)
  pallas_mosaic_fwd  ``backend="mosaic_fwd"``: the Mosaic GPU forward, the Triton-lowered
               backward
  any pallas* name may end in ``@BLOCK_L/SUB_L[/CTAS[/ROWS]]`` (e.g. ``pallas_mosaic@32/8/132``)
  to run with those ``ScanGpuBlockSizes`` block_l / sub_l instead of the defaults and, for the
  Mosaic kernels, ``selective_scan_mgpu.TARGET_CTAS`` = CTAS (below it sequences are split into
  segments) and ``selective_scan_mgpu.LOAD_ROWS`` = ROWS (positions per forward load chunk): a
  tuning sweep (every implementation is traced afresh: jax's caches are cleared before each)
  chunked      ``mamba_jax.ops.selective_scan.selective_scan(..., impl="chunked")`` (XLA)
  associative  ``selective_scan(..., impl="associative")`` (XLA, materializes (b, l, d, n))
  cuda         mamba_ssm's CUDA ``selective_scan_fn`` kernels (``selective_scan_cuda.fwd`` /
               ``.bwd``, called as ``selective_scan_fn`` calls them), when importable
all with D, delta_bias and delta_softplus (and z with ``--gate``), bf16 u / delta / B / C (/ z),
float32 A / D / delta_bias.

Times the forward and the forward+backward (gradients of every input, a random cotangent) as the
median over ``--reps`` repetitions (each ``--inner`` back-to-back calls, then a sync), after
warm-up. The floor is PERF.md's: max(bytes / 3.0 TB/s, exps / 4.2e12 per s), where the bytes
read every input once and write every output once (forward: u, delta, B, C (, z) in, y out;
backward on top: the same inputs and dy in, du, ddelta, dB, dC (, dz) out) and the exps are one
per (token, channel, state) in the forward, two in forward+backward (the special-function unit
of an H100 SXM: 132 SMs x 16 / clock x 1.98 GHz). "GB/s" is those floor bytes over the measured
time.

mamba_ssm: ``--mamba_ssm_path`` names a directory holding the built ``selective_scan_cuda``
extension (``selective_scan_cuda*.so``, built for the device from the mamba-ssm sdist, see
PERF.md); the cuda column is skipped with a message when it does not import.

Usage (on the GPU machine):
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python scripts/bench_selective_scan.py \\
      --mamba_ssm_path .device/selective_scan_build --out bench_selective_scan.json
Smoke check on CPU (Pallas interpreter, tiny shapes):
  PYTHONPATH=. python scripts/bench_selective_scan.py --small --interpret --out /tmp/s6.json
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_timing import COPY_BYTES_PER_S, EXP_PER_S, time_ms  # noqa: E402

DIFF_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def floor(tokens: int, d_inner: int, d_state: int, gate: bool) -> dict[str, float]:
  """Floor times (ms) and bytes of the forward and forward+backward, and the forward's exps
  (one per token, channel and state), bf16 inputs."""
  seq = tokens * d_inner * 2
  bc = tokens * d_state * 2 * 2
  fwd_bytes = (3 + gate) * seq + bc  # u, delta (, z), y; B, C
  bwd_bytes = (5 + 2 * gate) * seq + 2 * bc  # u, delta, dy (, z) in; du, ddelta (, dz) out
  exps = tokens * d_inner * d_state
  fwd = max(fwd_bytes / COPY_BYTES_PER_S, exps / EXP_PER_S)
  fwd_bwd = max((fwd_bytes + bwd_bytes) / COPY_BYTES_PER_S, 2 * exps / EXP_PER_S)
  return dict(fwd_ms=fwd * 1e3, fwd_bwd_ms=fwd_bwd * 1e3, fwd_bytes=fwd_bytes,
              fwd_bwd_bytes=fwd_bytes + bwd_bytes, exps=exps)



def make_inputs(batch: int, length: int, d_inner: int, d_state: int, gate: bool, seed: int = 0):
  """mamba_jax layout: u, delta, z, dy (b, l, d); B, C (b, l, n); A (d, n); D, delta_bias (d,)."""
  ks = jax.random.split(jax.random.key(seed), 9)
  bf, f32 = jnp.bfloat16, jnp.float32
  A = -jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=f32), (d_inner, d_state))  # S4D-real
  return dict(
      u=jax.random.normal(ks[0], (batch, length, d_inner), bf),
      delta=(jax.random.normal(ks[1], (batch, length, d_inner), f32) - 4.0).astype(bf),
      A=A,
      B=jax.random.normal(ks[2], (batch, length, d_state), bf),
      C=jax.random.normal(ks[3], (batch, length, d_state), bf),
      D=jax.random.normal(ks[4], (d_inner,), f32),
      z=jax.random.normal(ks[5], (batch, length, d_inner), bf) if gate else None,
      delta_bias=0.5 * jax.random.normal(ks[6], (d_inner,), f32),
      dy=jax.random.normal(ks[7], (batch, length, d_inner), bf),
  )


def bench_jax(scan, inp, reps: int, inner: int, warmup: int) -> tuple[float, float]:
  """scan(u, delta, A, B, C, D, z, delta_bias) -> y; forward and forward+backward ms."""
  args = tuple(inp[k] for k in DIFF_NAMES)
  fwd = jax.jit(scan)
  fwd_bwd = jax.jit(lambda args, dy: jax.vjp(scan, *args)[1](dy))
  sync = jax.block_until_ready
  return (time_ms(lambda: fwd(*args), sync, reps, inner, warmup),
          time_ms(lambda: fwd_bwd(args, inp["dy"]), sync, reps, inner, warmup))


def load_cuda(path: str):
  """The ``selective_scan_cuda`` extension from ``path``, or None with the reason printed."""
  if not path:
    print("cuda: no --mamba_ssm_path given: skipping the mamba_ssm CUDA column", flush=True)
    return None
  sys.path.insert(0, path)
  try:
    import torch  # noqa: F401  (the extension links against torch)
    import selective_scan_cuda
  except ImportError as e:
    print(f"cuda: selective_scan_cuda does not import from {path!r} ({e}): skipping the "
          "mamba_ssm CUDA column", flush=True)
    return None
  return selective_scan_cuda


def bench_cuda(ext, inp, reps: int, inner: int, warmup: int) -> tuple[float, float]:
  """mamba_ssm's kernels in their layout: u, delta, z (b, d, l); B, C (b, n, l)."""
  import torch
  to_t = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()
  channels_first = lambda a: to_t(a).transpose(1, 2).contiguous()
  bf = torch.bfloat16
  u, delta, B, C, dy = (channels_first(inp[k]).to(bf) for k in ("u", "delta", "B", "C", "dy"))
  B, C = B.unsqueeze(1), C.unsqueeze(1)   # (b, groups 1, n, l), as selective_scan_fn passes them
  z = None if inp["z"] is None else channels_first(inp["z"]).to(bf)
  A, D, bias = (to_t(inp[k]) for k in ("A", "D", "delta_bias"))

  def fwd():
    return ext.fwd(u, delta, A, B, C, D, z, bias, True)

  def fwd_bwd():
    out, x, *rest = ext.fwd(u, delta, A, B, C, D, z, bias, True)
    return ext.bwd(u, delta, A, B, C, D, z, bias, dy, x, out, None, True, False)

  sync = lambda _: torch.cuda.synchronize()
  result = (time_ms(fwd, sync, reps, inner, warmup), time_ms(fwd_bwd, sync, reps, inner, warmup))
  del u, delta, B, C, dy, z, A, D, bias
  torch.cuda.empty_cache()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--lengths", default="1024,4096,16384,65536")
  parser.add_argument("--d_inner", default="2048,5120", help="comma-separated d_inner values")
  parser.add_argument("--d_state", type=int, default=16)
  parser.add_argument("--gate", action="store_true", help="also pass z (silu gate)")
  parser.add_argument("--impls", default="pallas,chunked,associative,cuda")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--inner", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--mamba_ssm_path", default="",
                      help="directory with the built selective_scan_cuda extension")
  parser.add_argument("--small", action="store_true",
                      help="tiny shapes for a CPU smoke check (128 tokens, d_inner 32)")
  parser.add_argument("--interpret", action="store_true",
                      help="run the Pallas kernels in the interpreter (CPU)")
  parser.add_argument("--out", default="bench_selective_scan.json")
  args = parser.parse_args()
  if args.small:
    args.tokens, args.lengths, args.d_inner = 128, "32,128", "32"
    args.reps, args.inner, args.warmup = 2, 1, 1

  from mamba_jax.ops.selective_scan import selective_scan
  from pallas_kernels.gpu.selective_scan import selective_scan_pallas_gpu
  from pallas_kernels.gpu import selective_scan_mgpu
  from pallas_kernels.gpu.selective_scan_fwd import default_block_sizes
  default_target_ctas = selective_scan_mgpu.TARGET_CTAS
  default_load_rows = selective_scan_mgpu.LOAD_ROWS
  impls = args.impls.split(",")
  cuda = load_cuda(args.mamba_ssm_path) if "cuda" in impls else None
  if cuda is None:
    impls = [i for i in impls if i != "cuda"]

  def pallas_backend(backend, block_sizes):
    def scan(u, delta, A, B, C, D, z, delta_bias):
      blocks = None
      selective_scan_mgpu.TARGET_CTAS = default_target_ctas
      selective_scan_mgpu.LOAD_ROWS = default_load_rows
      if block_sizes:
        block_l, sub_l, *more = map(int, block_sizes.split("/"))
        blocks = dataclasses.replace(default_block_sizes(u.shape[2], 1, u.shape[0]),
                                     block_l=block_l, sub_l=sub_l)
        if more:   # read when the kernels are traced, i.e. inside this function
          selective_scan_mgpu.TARGET_CTAS = more[0]
        if len(more) > 1:
          selective_scan_mgpu.LOAD_ROWS = more[1]
      return selective_scan_pallas_gpu(u, delta, A, B, C, D, z, delta_bias, True,
                                       blocks=blocks, interpret=args.interpret, backend=backend)
    return scan

  def xla(impl):
    def scan(u, delta, A, B, C, D, z, delta_bias):
      return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, impl=impl)
    return scan

  device = jax.devices()[0].device_kind
  print(f"device: {device}; jax {jax.__version__}; tokens {args.tokens}; d_state "
        f"{args.d_state}; gate {args.gate}; interpret {args.interpret}", flush=True)
  rows = []
  for d_inner in map(int, args.d_inner.split(",")):
    for length in map(int, args.lengths.split(",")):
      batch = args.tokens // length
      inp = make_inputs(batch, length, d_inner, args.d_state, args.gate)
      fl = floor(args.tokens, d_inner, args.d_state, args.gate)
      for impl in impls:
        jax.clear_caches()   # the kernels' jitted wrappers must be traced with impl's settings
        try:
          name, _, block_sizes = impl.partition("@")
          if name in ("pallas", "pallas_mosaic", "pallas_mosaic_fwd"):
            backend = name.removeprefix("pallas_") if name != "pallas" else "triton"
            t = bench_jax(pallas_backend(backend, block_sizes), inp, args.reps, args.inner,
                          args.warmup)
          elif impl in ("chunked", "associative"):
            t = bench_jax(xla(impl), inp, args.reps, args.inner, args.warmup)
          elif impl == "cuda":
            t = bench_cuda(cuda, inp, args.reps, args.inner, args.warmup)
          else:
            raise ValueError(f"unknown impl {impl!r}")
        except Exception as e:  # a failing implementation is reported in the table, not hidden
          print(f"{impl} d={d_inner} L={length}: FAILED {type(e).__name__}: {str(e)[:300]}",
                flush=True)
          t = (math.nan, math.nan)
        row = dict(impl=impl, d_inner=d_inner, length=length, batch=batch, fwd_ms=t[0],
                   fwd_bwd_ms=t[1], fwd_floor_pct=100 * fl["fwd_ms"] / t[0],
                   fwd_bwd_floor_pct=100 * fl["fwd_bwd_ms"] / t[1],
                   fwd_gb_s=fl["fwd_bytes"] / t[0] / 1e6,
                   fwd_bwd_gb_s=fl["fwd_bwd_bytes"] / t[1] / 1e6)
        rows.append(row)
        print(json.dumps(row), flush=True)
  baselines = [b for b in ("cuda", "chunked", "associative") if b in impls]
  for r in rows:
    for base in baselines:
      ref = [s for s in rows if s["impl"] == base and s["length"] == r["length"]
             and s["d_inner"] == r["d_inner"]]
      for key in ("fwd", "fwd_bwd"):
        r[f"{key}_speedup_vs_{base}"] = ref[0][f"{key}_ms"] / r[f"{key}_ms"]
  print(f"\n{device}, {args.tokens} tokens, d_state {args.d_state}, bf16; speedup = baseline ms "
        "/ ms (fwd, fwd+bwd)")
  head = "| impl | d | L | fwd ms | fwd+bwd ms | " + " | ".join(
      f"vs {b}" for b in baselines) + " | fwd % floor | fwd+bwd % floor | fwd GB/s |"
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for r in rows:
    ratios = " | ".join(f"{r[f'fwd_speedup_vs_{b}']:.2f} / {r[f'fwd_bwd_speedup_vs_{b}']:.2f}"
                        for b in baselines)
    print(f"| {r['impl']} | {r['d_inner']} | {r['length']} | {r['fwd_ms']:.3f} "
          f"| {r['fwd_bwd_ms']:.3f} | {ratios} | {r['fwd_floor_pct']:.1f} "
          f"| {r['fwd_bwd_floor_pct']:.1f} | {r['fwd_gb_s']:.0f} |")
  with open(args.out, "w") as f:
    json.dump(dict(device=device, tokens=args.tokens, d_state=args.d_state, gate=args.gate,
                   interpret=args.interpret, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
