"""Kernel scaling: SSD and S6 against causal attention of equal width (Mamba Fig. 8 left, Mamba-2 Fig. 10).

At a fixed token count (batch x length), heads 32 x head_dim 64, groups 1, chunk 256, bf16:
  ssd        ours: ``pallas`` (pallas_kernels.gpu.ssd, Triton lowering), ``pallas_mgpu`` (its
             Mosaic GPU wgmma forward, same backward), ``chunked`` (XLA); mamba_ssm's Triton
             ``mamba_chunk_scan_combined`` (``triton``), through scripts/bench_ssd.py's timers
  attention  ``jax.nn.dot_product_attention(implementation="cudnn")``, causal, 32 x 64
  s6         ours: ``pallas`` (pallas_kernels.gpu.selective_scan, Triton lowering),
             ``pallas_mgpu`` (its Mosaic GPU kernels, ``backend="mosaic"``, what
             ``impl="pallas"`` runs on Hopper), ``chunked`` (XLA), d_state 16, through
             scripts/bench_selective_scan.py's timers
over sequence lengths (forward and forward+backward), then SSD time against the state size N.

Roofline: every row has its FLOPs, its fewest bytes (every input read once, every output
written once) and floor = max(bytes / 3.0 TB/s, FLOPs / 740 TFLOP/s) (S6: exps / the
special-function rate instead of FLOPs), the H100 ceilings of ../shared/PERF.md; "% floor" is
floor / measured. Counting:
  SSD        FLOPs T.G.Q.N + T.H.(Q.P + 4.N.P) forward (causal halves of C.Bᵀ and of the
             masked product with X, chunk states, state -> output), 3x that forward+backward;
             bytes x, dt, B, C in and y out (forward), plus x, dt, B, C, dy in and dx, ddt,
             dB, dC out (backward)
  attention  FLOPs 2.T.L.H.P forward (Q.Kᵀ and P.V, each 2.T.L.H.P / 2 causal), 3.5x that
             forward+backward (the backward's five products); bytes q, k, v in and o out
             (forward), plus q, k, v, o, do in and dq, dk, dv out (backward)
  S6         bench_selective_scan.floor

The crossover is the shortest length from which SSD (each of our implementations, and Triton)
is faster than attention at every longer length measured.

Rows are written to ``--out`` (JSON) after each measurement, so a run cut short by its time
limit keeps what it measured; ``--budget_s`` skips (and lists) the cases that would start
after that many seconds.

Usage (GPU):
  PYTHONPATH=.:scripts python scripts/bench_kernels.py --out /tmp/kernels.json
CPU smoke (tiny shapes, XLA forms only):
  PYTHONPATH=.:scripts python scripts/bench_kernels.py --smoke --out /tmp/kernels.json
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench_timing import COPY_BYTES_PER_S, MATMUL_FLOPS_PER_S  # noqa: E402

HEADS, HEAD_DIM, GROUPS = 32, 64, 1


def ssd_cost(tokens: int, state: int, chunk: int, heads: int = HEADS, head_dim: int = HEAD_DIM,
             groups: int = GROUPS) -> dict[str, float]:
  """FLOPs and fewest bytes of SSD over ``tokens`` tokens, bf16 x/B/C/y, float32 dt.

  Returns {"fwd_flops", "fwd_bwd_flops", "fwd_bytes", "fwd_bwd_bytes"}.
  """
  flops = tokens * groups * chunk * state + tokens * heads * (chunk * head_dim
                                                              + 4 * state * head_dim)
  xy = tokens * heads * head_dim * 2
  bc = tokens * groups * state * 2 * 2
  dt = tokens * heads * 4
  fwd_bytes = 2 * xy + bc + dt
  bwd_bytes = 3 * xy + 2 * bc + 2 * dt
  return dict(fwd_flops=flops, fwd_bwd_flops=3 * flops, fwd_bytes=fwd_bytes,
              fwd_bwd_bytes=fwd_bytes + bwd_bytes)


def attention_cost(batch: int, length: int, heads: int = HEADS, head_dim: int = HEAD_DIM,
                   causal: bool = True) -> dict[str, float]:
  """FLOPs and fewest bytes of (causal) softmax attention, bf16 q/k/v/o, (b, l, h, p)."""
  flops = 4 * batch * length * length * heads * head_dim // (2 if causal else 1)
  tensor = batch * length * heads * head_dim * 2
  return dict(fwd_flops=flops, fwd_bwd_flops=3.5 * flops, fwd_bytes=4 * tensor,
              fwd_bwd_bytes=4 * tensor + 8 * tensor)


def floor_ms(cost: dict[str, float]) -> tuple[float, float]:
  """(forward, forward+backward) floors in ms of a matmul-bound op: max(bytes, FLOPs) time."""
  fwd = max(cost["fwd_bytes"] / COPY_BYTES_PER_S, cost["fwd_flops"] / MATMUL_FLOPS_PER_S)
  fb = max(cost["fwd_bwd_bytes"] / COPY_BYTES_PER_S, cost["fwd_bwd_flops"] / MATMUL_FLOPS_PER_S)
  return fwd * 1e3, fb * 1e3


def crossover(rows: list[dict], impl: str, key: str = "fwd_bwd_ms",
              state: int | None = None) -> int | None:
  """Shortest length from which ssd ``impl`` beats attention at every longer measured length.

  ``rows``: kernel rows with op "ssd" / "attention", "length", "state" and ``key``; the SSD
  rows at ``state`` (default: the most common one) are used. None when it never beats
  attention (or there is no data).
  """
  att = {r["length"]: r[key] for r in rows if r["op"] == "attention" and _finite(r.get(key))}
  ssd = [r for r in rows if r["op"] == "ssd" and r["impl"] == impl and _finite(r.get(key))]
  if not ssd or not att:
    return None
  if state is None:
    states = [r["state"] for r in ssd]
    state = max(set(states), key=states.count)
  mine = {r["length"]: r[key] for r in ssd if r["state"] == state}
  lengths = sorted(set(mine) & set(att))
  best = None
  for length in reversed(lengths):
    if mine[length] < att[length]:
      best = length
    else:
      break
  return best


def crossovers(rows: list[dict], impls, state: int) -> dict[str, dict[str, int | None]]:
  """{impl: {"fwd": length, "fwd_bwd": length}} of :func:`crossover` at ``state``."""
  return {impl: dict(fwd=crossover(rows, impl, "fwd_ms", state),
                     fwd_bwd=crossover(rows, impl, "fwd_bwd_ms", state)) for impl in impls}


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _row(op, impl, length, batch, times, cost, floors, **extra):
  fwd, fb = times
  return dict(op=op, impl=impl, length=length, batch=batch, fwd_ms=fwd, fwd_bwd_ms=fb,
              **extra, **cost, fwd_floor_ms=floors[0], fwd_bwd_floor_ms=floors[1],
              fwd_floor_pct=100 * floors[0] / fwd if _finite(fwd) else None,
              fwd_bwd_floor_pct=100 * floors[1] / fb if _finite(fb) else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=262144, help="batch x length of every case")
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768,65536,131072,"
                      "262144", help="SSD / attention sequence lengths")
  parser.add_argument("--state", type=int, default=128, help="SSD state N of the length sweep")
  parser.add_argument("--states", default="16,32,64,128,256", help="N sweep (SSD)")
  parser.add_argument("--states_length", type=int, default=4096, help="length of the N sweep")
  parser.add_argument("--ssd_impls", default="pallas,pallas_mgpu,chunked,triton",
                      help="pallas (Triton-lowered Pallas), pallas_mgpu (Mosaic GPU forward), "
                           "chunked (XLA), triton (mamba_ssm)")
  parser.add_argument("--s6_impls", default="pallas,pallas_mgpu,chunked")
  parser.add_argument("--s6_lengths", default="1024,4096,16384,65536")
  parser.add_argument("--s6_d_inner", type=int, default=2048)
  parser.add_argument("--s6_tokens", type=int, default=65536)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--inner", type=int, default=2)
  parser.add_argument("--parts", default="lengths,s6,states",
                      help="which sweeps: lengths (SSD + attention), s6, states (SSD vs N)")
  parser.add_argument("--budget_s", type=float, default=1e9,
                      help="skip cases that would start after this many seconds")
  parser.add_argument("--mamba_ssm_root", default=".device/mamba_ssm-2.3.2.post1")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, XLA forms only, no attention (CPU smoke check)")
  parser.add_argument("--out", default="bench_kernels.json")
  args = parser.parse_args()
  if args.smoke:
    args.tokens, args.lengths, args.states, args.states_length = 256, "64,128", "8,16", 128
    args.state, args.chunk, args.s6_tokens, args.s6_lengths = 16, 32, 128, "64,128"
    args.s6_d_inner, args.ssd_impls, args.s6_impls = 32, "chunked", "chunked"
    args.reps, args.inner = 2, 1

  import jax
  import bench_selective_scan as s6
  import bench_ssd
  from bench_timing import environment, write_json
  from mamba_jax.ops.selective_scan import selective_scan
  from mamba_jax.ops.ssd import ssd

  start = time.perf_counter()
  device = jax.devices()[0].device_kind
  on_gpu = jax.default_backend() == "gpu"
  ssd_impls = args.ssd_impls.split(",")
  triton = None
  if "triton" in ssd_impls:
    try:
      triton = bench_ssd.load_mamba_ssm(args.mamba_ssm_root)
    except Exception as e:  # reported, not hidden: the column is absent and the reason logged
      print(f"triton: mamba_ssm does not import ({type(e).__name__}: {e}); no Triton column",
            flush=True)
      ssd_impls.remove("triton")
  ssd_fns = {"chunked": lambda *a, **k: ssd(*a, **k, impl="chunked")}
  backends = {"pallas": "triton", "pallas_mgpu": "mosaic"}  # bench_ssd.py's names
  for impl in set(ssd_impls) & set(backends):
    from pallas_kernels.gpu.ssd import ssd_pallas_gpu
    ssd_fns[impl] = functools.partial(ssd_pallas_gpu, backend=backends[impl])

  result = dict(section="kernels", device=device, env=environment(), args=vars(args),
                heads=HEADS, head_dim=HEAD_DIM, groups=GROUPS, rows=[], skipped=[],
                errors=[])

  def measure(label, fn):
    """fn() -> (fwd_ms, fwd_bwd_ms), NaNs and an error entry when it raises."""
    if time.perf_counter() - start > args.budget_s:
      result["skipped"].append(label)
      return None
    try:
      return fn()
    except Exception as e:  # one failing case (OOM, lowering) must not end the sweep
      result["errors"].append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
      print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      return (math.nan, math.nan)

  def add(row):
    result["rows"].append(row)
    print({k: row[k] for k in ("op", "impl", "length", "batch", "fwd_ms", "fwd_bwd_ms",
                               "fwd_floor_pct", "fwd_bwd_floor_pct")}, flush=True)
    write_json(args.out, result)

  def ssd_case(length, state, impls, with_attention):
    batch = args.tokens // length
    if batch < 1:
      return
    inp = bench_ssd.make_inputs(batch, length, state)
    cost = ssd_cost(args.tokens, state, args.chunk)
    floors = floor_ms(cost)
    for impl in impls:
      label = f"ssd {impl} L={length} N={state}"
      if impl == "triton":
        t = measure(label, lambda: bench_ssd.bench_triton(triton, inp, args.chunk, args.reps,
                                                          args.inner))
      else:
        t = measure(label, lambda: bench_ssd.bench_jax_ssd(ssd_fns[impl], inp, args.chunk,
                                                           args.reps, args.inner))
      if t is not None:
        add(_row("ssd", impl, length, batch, t, cost, floors, state=state))
    del inp
    if with_attention and on_gpu:
      cost = attention_cost(batch, length)
      t = measure(f"attention cudnn L={length}",
                  lambda: bench_ssd.bench_cudnn(batch, length, args.reps, args.inner))
      if t is not None:
        add(_row("attention", "cudnn", length, batch, t, cost, floor_ms(cost), state=None))

  parts = args.parts.split(",")
  lengths = [int(v) for v in args.lengths.split(",")] if "lengths" in parts else []
  for length in lengths:
    ssd_case(length, args.state, ssd_impls, with_attention=True)
  s6_fns = {impl: (lambda impl: lambda u, delta, A, B, C, D, z, delta_bias: selective_scan(
      u, delta, A, B, C, D, z, delta_bias, True, impl=impl))(impl) for impl in ("chunked",)}
  if {"pallas", "pallas_mgpu"} & set(args.s6_impls.split(",")):
    from pallas_kernels.gpu.selective_scan import selective_scan_pallas_gpu
    for impl, backend in (("pallas", "triton"), ("pallas_mgpu", "mosaic")):
      s6_fns[impl] = (lambda backend: lambda u, delta, A, B, C, D, z, delta_bias:
                      selective_scan_pallas_gpu(u, delta, A, B, C, D, z, delta_bias, True,
                                                backend=backend))(backend)
  d_state = 16
  for length in (int(v) for v in args.s6_lengths.split(",") if "s6" in parts):
    batch = args.s6_tokens // length
    if batch < 1:
      continue
    inp = s6.make_inputs(batch, length, args.s6_d_inner, d_state, False)
    fl = s6.floor(args.s6_tokens, args.s6_d_inner, d_state, False)
    cost = dict(fwd_exps=fl["exps"], fwd_bwd_exps=2 * fl["exps"], fwd_bytes=fl["fwd_bytes"],
                fwd_bwd_bytes=fl["fwd_bwd_bytes"])
    for impl in args.s6_impls.split(","):
      t = measure(f"s6 {impl} L={length}",
                  lambda: s6.bench_jax(s6_fns[impl], inp, args.reps, args.inner, 3))
      if t is not None:
        add(_row("s6", impl, length, batch, t, cost, (fl["fwd_ms"], fl["fwd_bwd_ms"]),
                 d_inner=args.s6_d_inner, state=d_state))
    del inp

  for state in (int(v) for v in args.states.split(",") if "states" in parts):
    if state != args.state or args.states_length not in lengths:
      ssd_case(args.states_length, state, ssd_impls, with_attention=False)

  result["crossover"] = crossovers(result["rows"], ssd_impls, args.state)
  result["elapsed_s"] = time.perf_counter() - start
  write_json(args.out, result)
  print("crossover (shortest length from which SSD beats cuDNN attention):",
        result["crossover"], flush=True)


if __name__ == "__main__":
  main()
