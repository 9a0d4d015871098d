"""The Mamba mixers' elementwise ops, XLA against the Pallas GPU kernels, at the models' sizes.

Ops (bf16 activations, float32 parameters, as in training):
  conv   ``mamba_jax.ops.causal_conv1d`` with silu and bias, width 4, over c channels
         (Mamba-2: d_ssm + 2·N; Mamba-1: d_inner)
  norm   ``mamba_jax.ops.norms.gated_rms_norm`` (Mamba-2's gate-then-normalise, one group)
for ``--impls`` (``xla`` and ``pallas``, same process, same inputs): forward and
forward+backward (``jax.vjp`` of the op, all gradients) median ms, the fewest bytes of each
(every input read once, every output written once: conv forward x in, y out; forward+backward
adds x, dy in and dx out; norm forward x, z in, y out; backward adds x, z, dy in, dx, dz out),
"% floor" = bytes / 3.0 TB/s (PERF.md's H100 copy bandwidth) / measured, and each impl's
speed-up over the first.

Usage (GPU): PYTHONPATH=. python scripts/bench_mixer_ops.py --out /tmp/mixer_ops.json
CPU smoke: PYTHONPATH=. python scripts/bench_mixer_ops.py --smoke --out /tmp/mixer_ops.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_timing import environment, time_ms, write_json  # noqa: E402
from mamba_jax.ops.causal_conv1d import causal_conv1d  # noqa: E402
from mamba_jax.ops.norms import gated_rms_norm  # noqa: E402

COPY_BYTES_PER_S = 3.0e12
# name: (op, channels): Mamba-2 130M / 370M / 1.3B (conv over d_ssm + 2·128, norm over
# d_ssm), Mamba-1 1.4B (conv over d_inner).
SHAPES = {
    "mamba2-130m": (("conv", 1792), ("norm", 1536)),
    "mamba2-370m": (("conv", 2304), ("norm", 2048)),
    "mamba2-1.3b": (("conv", 4352), ("norm", 4096)),
    "mamba-1.4b": (("conv", 4096),),
}


def op_fn(op: str, impl: str):
  """The forward of one op and impl, taking ``op_args``' arrays."""
  if op == "conv":
    return lambda x, w, b: causal_conv1d(x, w, b, activation="silu", impl=impl)
  return lambda x, z, w: gated_rms_norm(x, z, w, impl=impl)


def op_args(op: str, key, batch: int, length: int, channels: int):
  ks = jax.random.split(key, 3)
  act = lambda k: jax.random.normal(k, (batch, length, channels), jnp.float32).astype(
      jnp.bfloat16)
  if op == "conv":
    return (act(ks[0]), 0.3 * jax.random.normal(ks[1], (channels, 4)),
            jax.random.normal(ks[2], (channels,)))
  return act(ks[0]), act(ks[1]), 1.0 + 0.1 * jax.random.normal(ks[2], (channels,))


def bytes_moved(op: str, tokens: int, channels: int) -> tuple[int, int]:
  """(forward, forward+backward) fewest bytes in bf16 (module docstring)."""
  act = 2 * tokens * channels
  return (2 * act, 5 * act) if op == "conv" else (3 * act, 8 * act)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(SHAPES))
  parser.add_argument("--ops", default="conv,norm")
  parser.add_argument("--impls", default="xla,pallas")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, kernels in the interpreter (CPU)")
  parser.add_argument("--out", default="bench_mixer_ops.json")
  args = parser.parse_args()
  impls = args.impls.split(",")
  if args.smoke:
    args.batch, args.length, args.reps, args.inner = 1, 64, 2, 1
    impls = [i if i != "pallas" else "pallas_interpret" for i in impls]
  tokens = args.batch * args.length
  rows = []
  print(f"{'model':12s} {'op':5s} {'chan':>5s} {'impl':16s} {'fwd ms':>8s} {'%fl':>4s} "
        f"{'f+b ms':>8s} {'%fl':>4s} {'f+b x':>6s}")
  for model in args.models.split(","):
    for op, channels in SHAPES[model]:
      if op not in args.ops.split(","):
        continue
      if args.smoke:
        channels = 64
      inputs = op_args(op, jax.random.key(channels), args.batch, args.length, channels)
      fwd_bytes, total_bytes = bytes_moved(op, tokens, channels)
      base = None
      for impl in impls:
        fwd = op_fn(op, impl)
        fwd_jit = jax.jit(fwd)

        @jax.jit
        def fwd_bwd(*a, fwd=fwd):
          y, vjp = jax.vjp(fwd, *a)
          return vjp(y)

        sync = jax.block_until_ready
        fwd_ms = time_ms(lambda: fwd_jit(*inputs), sync, args.reps, args.inner)
        total_ms = time_ms(lambda: fwd_bwd(*inputs), sync, args.reps, args.inner)
        base = base or total_ms
        row = dict(model=model, op=op, channels=channels, impl=impl, tokens=tokens,
                   fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(total_ms, 4),
                   fwd_floor_pct=round(100 * fwd_bytes / COPY_BYTES_PER_S / 1e-3 / fwd_ms, 1),
                   fwd_bwd_floor_pct=round(
                       100 * total_bytes / COPY_BYTES_PER_S / 1e-3 / total_ms, 1),
                   fwd_bwd_speedup=round(base / total_ms, 3))
        rows.append(row)
        print(f"{model:12s} {op:5s} {channels:5d} {impl:16s} {fwd_ms:8.3f} "
              f"{row['fwd_floor_pct']:4.0f} {total_ms:8.3f} {row['fwd_bwd_floor_pct']:4.0f} "
              f"{row['fwd_bwd_speedup']:6.2f}", flush=True)
  write_json(args.out, dict(section="mixer_ops", device=str(jax.devices()[0].device_kind),
                            env=environment(), args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
