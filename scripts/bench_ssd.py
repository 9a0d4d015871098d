"""Benchmark of Mamba-2 SSD implementations side by side on one GPU, in one process.

Compares, at heads 32 x head_dim 64, groups 1, a fixed token count (batch x length):
  pallas   ``pallas_kernels.gpu.ssd.ssd_pallas_gpu(backend="triton")`` (Pallas kernels, Triton
           lowering, forward and backward)
  pallas_mgpu  ``ssd_pallas_gpu(backend="mosaic")``: the forward in Mosaic GPU wgmma kernels
           (Hopper), the backward the Triton-lowered one
  pallas_mgpu_shared_w  the same with ``bwd="shared_w"`` (dB / dC through the head-summed W)
  chunked  ``mamba_jax.ops.ssd.ssd(..., impl="chunked")`` (plain jnp / XLA)
  triton   mamba_ssm 2.3.2.post1's ``mamba_chunk_scan_combined`` (PyTorch + Triton)
  cudnn    ``jax.nn.dot_product_attention(implementation="cudnn")``, causal, same width
all with chunk 256, D (per head), dt_bias, dt_softplus, bf16 x/B/C, float32 A/D/dt/dt_bias.

``--stages`` also times the forward's kernels one by one for both Pallas backends (chunk state,
state passing, chunk scan) on the same inputs.

Times the forward and the forward+backward (gradients of every input, a random cotangent) as the
median over ``--reps`` repetitions (each ``--inner`` back-to-back calls, then a sync), after
warm-up. The floor is PERF.md's: max(bytes / 3.0 TB/s, FLOPs / 740 TFLOP/s) with forward bytes
x, dt, B, C read and y written once, FLOPs T.G.Q.N + T.H.(Q.P + 4.N.P), fwd+bwd = 3x the FLOPs
and the bytes of x, dt, B, C, dy read and dx, ddt, dB, dC written on top of the forward's.

mamba_ssm: pass ``--mamba-ssm-root`` = an unpacked mamba-ssm sdist (its package ``__init__``
needs CUDA extensions, so only ``mamba_ssm.ops.triton.ssd_combined`` is imported, under a bare
package module).

Usage (on the GPU machine):
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python scripts/bench_ssd.py \
      --mamba-ssm-root .device/mamba_ssm-2.3.2.post1 --out /tmp/bench_ssd.json
Prints a markdown table; writes JSON, and a PNG next to it when matplotlib imports.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_timing import (COPY_BYTES_PER_S, MATMUL_FLOPS_PER_S, environment,  # noqa: E402
                          time_ms)

HEADS, HEAD_DIM, GROUPS = 32, 64, 1


def floor_ms(tokens: int, state: int, chunk: int) -> tuple[float, float]:
  """(forward, forward+backward) floors in ms, as PERF.md counts them."""
  flops = (tokens * GROUPS * chunk * state
           + tokens * HEADS * (chunk * HEAD_DIM + 4 * state * HEAD_DIM))
  xy = tokens * HEADS * HEAD_DIM * 2
  bc = tokens * GROUPS * state * 2 * 2
  dt = tokens * HEADS * 4
  fwd_bytes = 2 * xy + bc + dt
  bwd_bytes = 2 * xy + 2 * bc + 2 * dt + xy   # read x, B, C, dt, dy; write dx, dB, dC, ddt
  fwd = max(fwd_bytes / COPY_BYTES_PER_S, flops / MATMUL_FLOPS_PER_S)
  fb = max((fwd_bytes + bwd_bytes) / COPY_BYTES_PER_S, 3 * flops / MATMUL_FLOPS_PER_S)
  return fwd * 1e3, fb * 1e3



def jax_sync(out):
  jax.block_until_ready(out)


def make_inputs(batch: int, length: int, state: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 9)
  bf = jnp.bfloat16
  return dict(
      x=jax.random.normal(ks[0], (batch, length, HEADS, HEAD_DIM), bf),
      dt=jax.random.normal(ks[1], (batch, length, HEADS), jnp.float32) - 2.0,
      A=-jnp.exp(jax.random.uniform(ks[2], (HEADS,), jnp.float32, 0.0, 2.0)),
      B=jax.random.normal(ks[3], (batch, length, GROUPS, state), bf),
      C=jax.random.normal(ks[4], (batch, length, GROUPS, state), bf),
      D=jax.random.normal(ks[5], (HEADS,), jnp.float32),
      dt_bias=jax.random.normal(ks[6], (HEADS,), jnp.float32) * 0.5,
      dy=jax.random.normal(ks[7], (batch, length, HEADS, HEAD_DIM), bf),
  )


def bench_jax_ssd(fn, inp, chunk: int, reps: int, inner: int,
                  backward: bool = True) -> tuple[float, float]:
  names = ("x", "dt", "A", "B", "C", "D", "dt_bias")

  def f(x, dt, A, B, C, D, dt_bias):
    return fn(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)

  args = tuple(inp[k] for k in names)
  fwd = jax.jit(f)
  fwd_bwd = jax.jit(lambda args, dy: jax.vjp(f, *args)[1](dy))
  t_f = time_ms(lambda: fwd(*args), jax_sync, reps, inner)
  if not backward:
    return t_f, math.nan
  t_fb = time_ms(lambda: fwd_bwd(args, inp["dy"]), jax_sync, reps, inner)
  return t_f, t_fb


def bench_cudnn(batch: int, length: int, reps: int, inner: int,
                backward: bool = True) -> tuple[float, float]:
  ks = jax.random.split(jax.random.key(1), 4)
  shape = (batch, length, HEADS, HEAD_DIM)
  q, k, v, dy = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)

  def f(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

  fwd = jax.jit(f)
  fwd_bwd = jax.jit(lambda q, k, v, dy: jax.vjp(f, q, k, v)[1](dy))
  return (time_ms(lambda: fwd(q, k, v), jax_sync, reps, inner),
          time_ms(lambda: fwd_bwd(q, k, v, dy), jax_sync, reps, inner) if backward else math.nan)


def load_mamba_ssm(root: str):
  """mamba_ssm's Triton SSD from an unpacked sdist, skipping the package's CUDA imports."""
  pkg = types.ModuleType("mamba_ssm")
  pkg.__path__ = [os.path.join(root, "mamba_ssm")]
  sys.modules["mamba_ssm"] = pkg
  from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
  return mamba_chunk_scan_combined


def bench_triton(combined, inp, chunk: int, reps: int, inner: int,
                 backward: bool = True) -> tuple[float, float]:
  import torch
  to_t = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()
  bf = torch.bfloat16
  x, B, C, dy = (to_t(inp[k]).to(bf) for k in ("x", "B", "C", "dy"))
  dt, A, D, dt_bias = (to_t(inp[k]) for k in ("dt", "A", "D", "dt_bias"))
  leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]

  def fwd():
    with torch.no_grad():
      return combined(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True)

  def fwd_bwd():
    out = combined(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
    return torch.autograd.grad(out, leaves, dy)

  sync = lambda _: torch.cuda.synchronize()
  result = (time_ms(fwd, sync, reps, inner),
            time_ms(fwd_bwd, sync, reps, inner) if backward else math.nan)
  del x, B, C, dy, dt, A, D, dt_bias, leaves
  torch.cuda.empty_cache()
  return result


def bench_stages(inp, chunk: int, reps: int, inner: int) -> dict[str, float]:
  """ms of each forward kernel of the two Pallas backends, on the preprocessed inputs."""
  from pallas_kernels.gpu import ssd as pssd
  from pallas_kernels.gpu.ssd_blocks import tuned_block_sizes
  from pallas_kernels.gpu.ssd_chunk_scan import chunk_scan_fwd
  from pallas_kernels.gpu.ssd_chunk_state import chunk_state
  from pallas_kernels.gpu.ssd_mgpu_chunk_scan import chunk_scan_fwd_mgpu
  from pallas_kernels.gpu.ssd_mgpu_chunk_state import chunk_state_mgpu
  from pallas_kernels.gpu.ssd_mgpu_state_passing import state_passing_fwd_mgpu
  from pallas_kernels.gpu.ssd_state_passing import state_passing_fwd
  x, b, c = inp["x"], inp["B"], inp["C"]
  batch, length, heads, p = x.shape
  n = b.shape[-1]
  chunks = length // chunk
  blocks = tuned_block_sizes(p, n, chunk)
  dt = jnp.transpose(jax.nn.softplus(inp["dt"] + inp["dt_bias"]), (0, 2, 1))
  cs, dte, w_off, lam = jax.jit(functools.partial(pssd._decays, seq_idx=None,
                                                  chunk_size=chunk))(dt, inp["A"])
  w = dte * dt
  d = jnp.broadcast_to(inp["D"][:, None], (heads, p))
  states = chunk_state(x, b, w, chunk_size=chunk, blocks=blocks)
  init = jnp.zeros((batch, heads, p * n), jnp.float32)
  all_states = state_passing_fwd(states.reshape(batch, chunks, heads, p * n), lam, init,
                                 blocks=blocks).reshape(batch, chunks + 1, heads, p, n)
  flat_states = states.reshape(batch, chunks, heads, p * n)
  prev = state_passing_fwd_mgpu(flat_states, lam, None, low_dtype=x.dtype,
                                keep_all=False)[1].reshape(batch, chunks, heads, p, n)
  runs = {
      "chunk_state triton": lambda: chunk_state(x, b, w, chunk_size=chunk, blocks=blocks),
      "chunk_state mosaic": lambda: chunk_state_mgpu(x, b, w, chunk_size=chunk),
      "state_passing triton": lambda: state_passing_fwd(flat_states, lam, init, blocks=blocks),
      "state_passing mosaic (+ x-dtype copy, all float32 states)": lambda:
          state_passing_fwd_mgpu(flat_states, lam, None, low_dtype=x.dtype),
      "state_passing mosaic (x-dtype copy + final state)": lambda: state_passing_fwd_mgpu(
          flat_states, lam, None, low_dtype=x.dtype, keep_all=False),
      "chunk_scan triton": lambda: chunk_scan_fwd(x, b, c, dt, cs, w_off, all_states, d,
                                                  chunk_size=chunk, blocks=blocks),
      "chunk_scan mosaic": lambda: chunk_scan_fwd_mgpu(x, b, c, dt, cs, w_off, prev, d,
                                                       chunk_size=chunk),
  }
  return {k: time_ms(f, jax_sync, reps, inner) for k, f in runs.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--cases", default="1024:128,4096:128,16384:128,65536:128,4096:64,4096:256",
                      help="comma-separated length:state pairs")
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--impls", default="pallas,pallas_mgpu,chunked,triton,cudnn")
  parser.add_argument("--no-backward", action="store_true",
                      help="time the forward only (fwd+bwd columns are NaN)")
  parser.add_argument("--stages", action="store_true",
                      help="also time the Pallas forward kernels one by one")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--inner", type=int, default=3)
  parser.add_argument("--mamba-ssm-root", default=".device/mamba_ssm-2.3.2.post1")
  parser.add_argument("--out", default="bench_ssd.json")
  args = parser.parse_args()

  from mamba_jax.ops.ssd import ssd
  from pallas_kernels.gpu.ssd import ssd_pallas_gpu
  impls = args.impls.split(",")
  bwd = not args.no_backward
  combined = load_mamba_ssm(args.mamba_ssm_root) if "triton" in impls else None
  device = jax.devices()[0].device_kind
  print(f"device: {device}; jax {jax.__version__}; tokens {args.tokens}; heads {HEADS} x "
        f"head_dim {HEAD_DIM}, groups {GROUPS}, chunk {args.chunk}", flush=True)
  rows, stage_rows = [], []

  def save():
    """Writes --out; after every row too, so that a run stopped at a time limit keeps them."""
    for r in rows:
      ref = [s for s in rows if s["impl"] == "triton" and s["length"] == r["length"]
             and s["state"] == r["state"]]
      r["fwd_vs_triton"] = ref[0]["fwd_ms"] / r["fwd_ms"] if ref else math.nan
      r["fwd_bwd_vs_triton"] = ref[0]["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else math.nan
    with open(args.out, "w") as f:
      json.dump(dict(device=device, environment=environment(), jax=jax.__version__,
                     tokens=args.tokens, chunk=args.chunk, rows=rows, stages=stage_rows), f,
                indent=1)

  for case in args.cases.split(","):
    length, state = map(int, case.split(":"))
    batch = args.tokens // length
    inp = make_inputs(batch, length, state)
    f_floor, fb_floor = floor_ms(args.tokens, state, args.chunk)
    for impl in impls:
      if impl == "cudnn" and any(r["impl"] == "cudnn" and r["length"] == length for r in rows):
        continue
      try:
        if impl in ("pallas", "pallas_mgpu", "pallas_mgpu_shared_w"):
          backend = "triton" if impl == "pallas" else "mosaic"
          kernels_bwd = "shared_w" if impl.endswith("shared_w") else "per_head"
          t = bench_jax_ssd(functools.partial(ssd_pallas_gpu, backend=backend, bwd=kernels_bwd),
                            inp, args.chunk, args.reps, args.inner, bwd)
        elif impl == "chunked":
          t = bench_jax_ssd(lambda *a, **k: ssd(*a, **k, impl="chunked"), inp, args.chunk,
                            args.reps, args.inner, bwd)
        elif impl == "triton":
          t = bench_triton(combined, inp, args.chunk, args.reps, args.inner, bwd)
        elif impl == "cudnn":
          t = bench_cudnn(batch, length, args.reps, args.inner, bwd)
        else:
          raise ValueError(f"unknown impl {impl!r}")
      except Exception as e:  # a failing implementation is reported in the table, not hidden
        print(f"{impl} L={length} N={state}: FAILED {type(e).__name__}: {str(e)[:300]}",
              flush=True)
        t = (math.nan, math.nan)
      row = dict(impl=impl, length=length, state=state, batch=batch, fwd_ms=t[0],
                 fwd_bwd_ms=t[1], fwd_floor_pct=100 * f_floor / t[0],
                 fwd_bwd_floor_pct=100 * fb_floor / t[1])
      rows.append(row)
      print(json.dumps(row), flush=True)
      save()
    if args.stages:
      try:
        stages = bench_stages(inp, args.chunk, args.reps, args.inner)
      except Exception as e:  # reported, not hidden: the end-to-end rows above still stand
        print(f"stages L={length} N={state}: FAILED {type(e).__name__}: {str(e)[:300]}",
              flush=True)
      else:
        stage_rows.append(dict(length=length, state=state, **stages))
        print(json.dumps(stage_rows[-1]), flush=True)
  save()
  print(f"\n{device}, {args.tokens} tokens, 32 heads x 64, groups 1, chunk {args.chunk}, bf16; "
        "speedup = Triton ms / ms")
  print("| impl | L | N | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup "
        "| fwd % floor | fwd+bwd % floor |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['impl']} | {r['length']} | {r['state'] if r['impl'] != 'cudnn' else '-'} "
          f"| {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_vs_triton']:.2f} "
          f"| {r['fwd_bwd_vs_triton']:.2f} | {r['fwd_floor_pct']:.1f} "
          f"| {r['fwd_bwd_floor_pct']:.1f} |")
  if stage_rows:
    names = [k for k in stage_rows[0] if k not in ("length", "state")]
    print("\nforward kernels, ms\n| L | N | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in stage_rows:
      print(f"| {r['length']} | {r['state']} | " + " | ".join(f"{r[k]:.3f}" for k in names)
            + " |")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot")
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
    plotted = False
    for impl in impls:
      pts = sorted((r["length"], r[key]) for r in rows
                   if r["impl"] == impl and (r["state"] == 128 or impl == "cudnn")
                   and math.isfinite(r[key]))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
        plotted = True
    if not plotted:   # e.g. --no-backward
      ax.set_visible(False)
      continue
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (batch x length = %d)" % args.tokens)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{device}, N = 128")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=120)


if __name__ == "__main__":
  main()
