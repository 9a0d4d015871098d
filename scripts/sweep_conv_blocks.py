"""Tile sizes of the causal-conv kernels (``pallas_kernels.gpu.causal_conv1d``) on this GPU.

Times the forward and the backward kernel alone, bf16 activations, silu and bias, for every
``ConvBlocks`` of the grids below at each ``--channels``, and prints them fastest first with
the fewest bytes' share of the copy bandwidth ("% floor": forward x in, y out; backward x, dy
in, dx out; 3.0 TB/s). The kernels' defaults (``FWD_BLOCKS`` / ``BWD_BLOCKS``) come from it.

Usage (GPU): PYTHONPATH=. python scripts/sweep_conv_blocks.py --out /tmp/conv_blocks.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_timing import environment, time_ms, write_json  # noqa: E402
from pallas_kernels.gpu.causal_conv1d import (ConvBlocks, causal_conv1d_bwd_pallas,  # noqa: E402
                                              causal_conv1d_fwd_pallas)

COPY_BYTES_PER_S = 3.0e12


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--channels", default="1792,4096")
  parser.add_argument("--fwd_l", default="32,64,128")
  parser.add_argument("--fwd_c", default="64,128,256")
  parser.add_argument("--bwd_l", default="16,32,64")
  parser.add_argument("--bwd_c", default="64,128")
  parser.add_argument("--sub_tiles", default="1,4")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--out", default="conv_blocks.json")
  args = parser.parse_args()
  ints = lambda s: [int(v) for v in s.split(",")]
  rows = []
  for channels in ints(args.channels):
    ks = jax.random.split(jax.random.key(channels), 4)
    shape = (args.batch, args.length, channels)
    x = jax.random.normal(ks[0], shape).astype(jnp.bfloat16)
    dy = jax.random.normal(ks[1], shape).astype(jnp.bfloat16)
    w = 0.3 * jax.random.normal(ks[2], (channels, 4))
    b = jax.random.normal(ks[3], (channels,))
    act_bytes = 2 * x.size
    grids = {
        "fwd": [ConvBlocks(bl, bc, 1, nw) for bl, bc, nw in
                itertools.product(ints(args.fwd_l), ints(args.fwd_c), ints(args.warps))],
        "bwd": [ConvBlocks(bl, bc, st, nw) for bl, bc, st, nw in
                itertools.product(ints(args.bwd_l), ints(args.bwd_c), ints(args.sub_tiles),
                                  ints(args.warps))],
    }
    for kind, configs in grids.items():
      for blocks in configs:
        if kind == "fwd":
          fn = lambda blocks=blocks: causal_conv1d_fwd_pallas(x, w, b, silu=True, blocks=blocks)
          moved = 2 * act_bytes
        else:
          fn = lambda blocks=blocks: causal_conv1d_bwd_pallas(x, w, b, dy, silu=True,
                                                              blocks=blocks)
          moved = 3 * act_bytes
        try:
          ms = time_ms(fn, jax.block_until_ready, args.reps, args.inner)
        except Exception as e:  # a tile that does not compile is reported, not fatal
          rows.append(dict(kind=kind, channels=channels, blocks=blocks._asdict(),
                           error=f"{type(e).__name__}: {str(e)[:200]}"))
          print(kind, channels, blocks, "failed:", str(e)[:200], flush=True)
          continue
        rows.append(dict(kind=kind, channels=channels, blocks=blocks._asdict(),
                         ms=round(ms, 4),
                         floor_pct=round(100 * moved / COPY_BYTES_PER_S / 1e-3 / ms, 1)))
    for kind in grids:
      done = sorted((r for r in rows if r["kind"] == kind and r["channels"] == channels
                     and "ms" in r), key=lambda r: r["ms"])
      print(f"{kind} c={channels}: fastest first")
      for r in done[:8]:
        print(f"  {r['ms']:8.4f} ms {r['floor_pct']:5.1f} %  {r['blocks']}")
  write_json(args.out, dict(section="conv_blocks", device=str(jax.devices()[0].device_kind),
                            env=environment(), args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
