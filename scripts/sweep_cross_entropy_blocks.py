"""Tile sizes of the cross-entropy kernels (``pallas_kernels.gpu.cross_entropy``) on this GPU.

Times the forward and the backward kernel alone on bf16 logits for every
``CrossEntropyBlocks`` of the grids below, and, in the same process on the same inputs, the op
``softmax_cross_entropy_with_accuracy`` forward and forward + backward with impl "xla" and
"pallas" (the defaults). Prints them fastest first with the fewest bytes' share of the copy
bandwidth ("% floor", 3.0 TB/s): forward, the logits read once; backward, read once and the
gradient written once; the op's forward + backward, both. The kernels' defaults
(``FORWARD_BLOCKS`` / ``BACKWARD_BLOCKS``) are to come from it.

Usage (GPU): PYTHONPATH=. python scripts/sweep_cross_entropy_blocks.py --out /tmp/ce_blocks.json
CPU smoke: PYTHONPATH=. python scripts/sweep_cross_entropy_blocks.py --smoke --out /tmp/ce.json
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
from mamba_jax.ops.cross_entropy import softmax_cross_entropy_with_accuracy  # noqa: E402
from pallas_kernels.gpu.cross_entropy import (CrossEntropyBlocks,  # noqa: E402
                                              cross_entropy_bwd, cross_entropy_fwd)

COPY_BYTES_PER_S = 3.0e12


def _timed(rows: list, fn, moved_bytes: int, reps: int, inner: int, **row) -> None:
  """Times ``fn`` and appends its row (ms and % floor, or the error it raised)."""
  try:
    ms = time_ms(fn, jax.block_until_ready, reps, inner)
  except Exception as e:  # a tile that does not compile is reported, not fatal
    rows.append(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}"))
    print(row, "failed:", str(e)[:200], flush=True)
    return
  rows.append(dict(row, ms=round(ms, 4),
                   floor_pct=round(100 * moved_bytes / COPY_BYTES_PER_S / 1e-3 / ms, 1)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=32768)
  parser.add_argument("--v_padded", type=int, default=50288)
  parser.add_argument("--vocab_size", type=int, default=50277)
  parser.add_argument("--block_rows", default="1,2,4")
  parser.add_argument("--block_cols", default="2048,4096,8192")
  parser.add_argument("--warps", default="4,8,16")
  parser.add_argument("--stages", default="1,2")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes and grids, kernels in the interpreter (CPU)")
  parser.add_argument("--out", default="cross_entropy_blocks.json")
  args = parser.parse_args()
  if args.smoke:
    args.rows, args.v_padded, args.vocab_size = 8, 300, 290
    args.block_rows, args.block_cols, args.warps, args.stages = "1,2", "64,128", "4", "1"
    args.reps, args.inner = 1, 1
  interpret = args.smoke
  ints = lambda s: [int(v) for v in s.split(",")]
  k_logits, k_targets, k_dloss = jax.random.split(jax.random.key(0), 3)
  logits = (3.0 * jax.random.normal(k_logits, (args.rows, args.v_padded))).astype(jnp.bfloat16)
  targets = jax.random.randint(k_targets, (args.rows,), 0, args.vocab_size, jnp.int32)
  dloss = jax.random.normal(k_dloss, (args.rows,), jnp.float32)
  logits_bytes = logits.size * logits.dtype.itemsize
  rows = []

  for impl in ("xla", "pallas_interpret" if interpret else "pallas"):
    op = jax.jit(lambda x, impl=impl: softmax_cross_entropy_with_accuracy(
        x, targets, args.vocab_size, impl=impl))
    op_grad = jax.jit(jax.grad(lambda x, impl=impl: jnp.sum(softmax_cross_entropy_with_accuracy(
        x, targets, args.vocab_size, impl=impl)[0] * dloss)))
    _timed(rows, lambda: op(logits), logits_bytes, args.reps, args.inner,
           kind="op_fwd", impl=impl)
    _timed(rows, lambda: op_grad(logits), 3 * logits_bytes, args.reps, args.inner,
           kind="op_fwd_bwd", impl=impl)

  lse = cross_entropy_fwd(logits, targets, vocab_size=args.vocab_size, interpret=interpret)[1]
  for blocks in itertools.starmap(CrossEntropyBlocks, itertools.product(
      ints(args.block_rows), ints(args.block_cols), ints(args.warps), ints(args.stages))):
    fwd = lambda blocks=blocks: cross_entropy_fwd(
        logits, targets, vocab_size=args.vocab_size, interpret=interpret, blocks=blocks)
    bwd = lambda blocks=blocks: cross_entropy_bwd(
        logits, targets, lse, dloss, vocab_size=args.vocab_size, interpret=interpret,
        blocks=blocks)
    _timed(rows, fwd, logits_bytes, args.reps, args.inner, kind="fwd",
           blocks=blocks._asdict())
    _timed(rows, bwd, 2 * logits_bytes, args.reps, args.inner, kind="bwd",
           blocks=blocks._asdict())

  for kind in ("op_fwd", "op_fwd_bwd", "fwd", "bwd"):
    done = sorted((r for r in rows if r["kind"] == kind and "ms" in r), key=lambda r: r["ms"])
    print(f"{kind} {args.rows} x {args.v_padded} (V {args.vocab_size}) bf16: fastest first")
    for r in done[:8]:
      print(f"  {r['ms']:8.4f} ms {r['floor_pct']:5.1f} %  {r.get('impl', r.get('blocks'))}")
  write_json(args.out, dict(section="cross_entropy_blocks",
                            device=str(jax.devices()[0].device_kind), env=environment(),
                            args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
