"""Sweeps the Pallas GPU SSD block sizes on the device and writes the tuned table.

For each state size n (head dim p, chunk q fixed), times ``ssd_pallas_gpu`` forward and
forward+backward (bf16, 65,536 tokens at length 4096, 32 heads, groups 1, D, dt_bias, softplus)
for every candidate ``SSDBlockSizes``, picks the one with the fastest forward+backward, and
writes ``pallas_kernels/gpu/ssd_block_table.py`` (or ``--table-out``) keyed by
(device, n, p, q). Timing: median of ``--reps`` repetitions after warm-up.

Usage (on the GPU machine):
  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python scripts/sweep_ssd_blocks.py \
      --states 64,128,256 --table-out /tmp/ssd_block_table.py
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pprint
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ssd import HEAD_DIM, bench_jax_ssd, make_inputs  # noqa: E402
from pallas_kernels.gpu import ssd_block_table  # noqa: E402
from pallas_kernels.gpu.ssd import ssd_pallas_gpu  # noqa: E402
from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes, device_key  # noqa: E402

HEADER = '''"""Tuned block sizes of the Pallas GPU SSD kernels, per device generation.

Written by ``scripts/sweep_ssd_blocks.py`` from timings on the device; do not edit by hand.
Keys: (device, state size n, head dim p, chunk size q); values: ``SSDBlockSizes`` fields.
{note}
"""

TABLE: dict[tuple[str, int, int, int], dict[str, int]] = '''


def candidates(state: int, tiles=((64, 64), (32, 32), (128, 64), (64, 32)),
               num_warps=(4, 8), num_warps_bwd=(4, 8)) -> list[SSDBlockSizes]:
  """Every (block_m, block_k) of ``tiles`` with each launch width (no 128-row blocks at
  n >= 256). ``num_warps`` only matters to the Triton-lowered forward (the Mosaic GPU forward
  that Hopper runs has its own tiles)."""
  out = []
  for (bm, bk), warps, warps_bwd in itertools.product(tiles, num_warps, num_warps_bwd):
    if state >= 256 and bm == 128:
      continue
    out.append(SSDBlockSizes(block_m=bm, block_k=bk, num_warps=warps, num_stages=2,
                             num_warps_bwd=warps_bwd))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--states", default="64,128,256")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--max-configs", type=int, default=1000)
  parser.add_argument("--table-out", default=ssd_block_table.__file__)
  parser.add_argument("--tiles", default="64:64,32:32,128:64,64:32",
                      help="comma-separated block_m:block_k candidates")
  parser.add_argument("--num_warps", default="4,8",
                      help="forward launch widths (Triton-lowered forward only)")
  parser.add_argument("--num_warps_bwd", default="4,8", help="backward launch widths")
  args = parser.parse_args()
  ints = lambda text: tuple(map(int, text.split(",")))
  tiles = tuple(tuple(map(int, t.split(":"))) for t in args.tiles.split(","))
  device = device_key()
  table = dict(ssd_block_table.TABLE)
  notes = []
  for state in map(int, args.states.split(",")):
    inp = make_inputs(args.tokens // args.length, args.length, state)
    results = []
    for blocks in candidates(state, tiles, ints(args.num_warps),
                             ints(args.num_warps_bwd))[:args.max_configs]:
      fn = lambda *a, blocks=blocks, **k: ssd_pallas_gpu(*a, **k, blocks=blocks)
      try:
        t_f, t_fb = bench_jax_ssd(fn, inp, args.chunk, args.reps, 2)
      except Exception as e:  # a config that fails to compile is reported and skipped
        print(f"n={state} {blocks}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      results.append((t_fb, t_f, blocks))
      print(f"n={state} fwd {t_f:.3f} ms fwd+bwd {t_fb:.3f} ms {blocks}", flush=True)
    if not results:
      raise RuntimeError(f"no block configuration ran for n={state}")
    t_fb, t_f, best = min(results, key=lambda r: r[0])
    table[(device, state, HEAD_DIM, args.chunk)] = dataclasses.asdict(best)
    notes.append(f"{device} n={state}: fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms "
                 f"(L={args.length}, {args.tokens} tokens, {len(results)} configs)")
    print(f"best n={state}: fwd {t_f:.3f} fwd+bwd {t_fb:.3f} {best}", flush=True)
  note = "Measured: " + "; ".join(notes) + "."
  with open(args.table_out, "w") as f:
    f.write(HEADER.format(note=note) + pprint.pformat(table, width=100) + "\n")
  print(f"wrote {args.table_out}")


if __name__ == "__main__":
  main()
