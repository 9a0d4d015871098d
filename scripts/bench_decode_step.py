"""Mamba-2's decoding step after in_proj: the fused Pallas kernel against its XLA form.

Times ``mamba_jax.ops.ssd_decode_step`` (conv step + SSD state update, the part of a Mamba-2
layer's decoding step between in_proj and the gated norm) at the sizes of the mamba2 presets,
as a decoding loop runs it: ``--steps`` steps inside one compiled ``lax.fori_loop`` that carries
the conv state, the SSM state and y, so that each step's launch gaps count and the state is
updated in place. Rows: the XLA form (``impl="xla"``) and the kernel at each ``--block_p`` ×
``--num_warps``, in one process; ms per step (median of ``--reps``), the fraction of the copy
ceiling the state traffic reaches (read + write of the (b, h, p, n) SSM state), and the XLA
form's time over each row's. Prints a table and writes JSON.

GPU: PYTHONPATH=. python scripts/bench_decode_step.py --out /tmp/decode_step.json
CPU smoke (the kernel interpreted): python scripts/bench_decode_step.py --smoke
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
import numpy as np  # noqa: E402

from bench_timing import COPY_BYTES_PER_S, environment, time_ms, write_json  # noqa: E402
from mamba_jax.config import preset  # noqa: E402
from mamba_jax.ops.ssd_decode_step import ssd_decode_step  # noqa: E402
from pallas_kernels.gpu.ssd_decode_step import (default_blocks, in_proj_width,  # noqa: E402
                                                ssd_decode_step_pallas)


def sizes(name: str) -> dict:
  """(h, p, n, g, w) of a mamba2 preset's mixer (d_mlp 0, as the presets have)."""
  config = preset(name)
  cfg = {"expand": 2, "headdim": 64, "d_state": 128, "ngroups": 1, "d_conv": 4,
         **config.ssm_cfg}
  d_ssm = cfg["expand"] * config.d_model
  return dict(h=d_ssm // cfg["headdim"], p=cfg["headdim"], n=cfg["d_state"],
              g=cfg["ngroups"], w=cfg["d_conv"])


def inputs(batch: int, h: int, p: int, n: int, g: int, w: int, dtype, state_dtype):
  rng = np.random.default_rng(0)
  c = h * p + 2 * g * n
  normal = lambda shape, dt, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), dt)
  return dict(zxbcdt=normal((batch, in_proj_width(0, h, p, g, n)), dtype),
              conv_state=normal((batch, c, w - 1), dtype),
              conv_weight=normal((c, w), dtype, 0.5), conv_bias=normal((c,), dtype, 0.1),
              ssm_state=normal((batch, h, p, n), state_dtype),
              A_log=jnp.asarray(np.log(rng.uniform(1, 16, h)), jnp.float32),
              D=normal((h,), jnp.float32), dt_bias=normal((h,), jnp.float32, 0.5))


def loop(step, steps: int):
  """A jitted fori_loop of ``steps`` calls of step(conv, ssm) -> (y, conv, ssm)."""

  @jax.jit
  def run(conv_state, ssm_state):
    def body(_, carry):
      conv, ssm, _ = carry
      y, conv, ssm = step(conv, ssm)
      return conv, ssm, y
    y0 = jnp.zeros(step(conv_state, ssm_state)[0].shape, conv_state.dtype)
    return jax.lax.fori_loop(0, steps, body, (conv_state, ssm_state, y0))

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mamba2-130m,mamba2-1.3b")
  parser.add_argument("--batches", default="1,64")
  parser.add_argument("--block_p", default="8,16,32,64")
  parser.add_argument("--num_warps", default="2,4,8")
  parser.add_argument("--state_dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, kernel interpreted")
  parser.add_argument("--out", default="bench_decode_step.json")
  args = parser.parse_args()
  interpret = args.smoke or jax.default_backend() != "gpu"
  if args.smoke:
    args.batches, args.block_p, args.num_warps, args.steps, args.reps = "1", "8", "4", 2, 1
  dtype, state_dtype = jnp.bfloat16, jnp.dtype(args.state_dtype)
  rows = []
  for name, batch in itertools.product(args.models.split(","),
                                       [int(b) for b in args.batches.split(",")]):
    dims = (dict(h=4, p=16, n=8, g=1, w=4) if args.smoke else sizes(name))
    a = inputs(batch, **dims, dtype=dtype, state_dtype=state_dtype)
    fixed = dict(conv_weight=a["conv_weight"], conv_bias=a["conv_bias"], A_log=a["A_log"],
                 D=a["D"], dt_bias=a["dt_bias"])
    kw = dict(d_mlp=0, groups=dims["g"], dt_softplus=True)
    state_bytes = 2 * a["ssm_state"].size * state_dtype.itemsize  # read + write per step
    variants = [("xla", None, None)] + [
        ("pallas", bp, nw) for bp in map(int, args.block_p.split(","))
        for nw in map(int, args.num_warps.split(",")) if dims["p"] % bp == 0]
    for impl, block_p, num_warps in variants:
      if impl == "xla":
        step = lambda conv, ssm: ssd_decode_step(a["zxbcdt"], conv, ssm_state=ssm, **fixed,
                                                 **kw, impl="xla")
      else:
        step = lambda conv, ssm, bp=block_p, nw=num_warps: ssd_decode_step_pallas(
            a["zxbcdt"], conv, fixed["conv_weight"], fixed["conv_bias"], ssm, fixed["A_log"],
            fixed["D"], fixed["dt_bias"], gate=False, dt_limit=(0.0, float("inf")),
            block_p=bp, num_warps=nw, interpret=interpret, **kw)
      run = loop(step, args.steps)
      ms = time_ms(lambda: run(a["conv_state"], a["ssm_state"]), jax.block_until_ready,
                   args.reps, 1, warmup=1) / args.steps
      rows.append(dict(model=name, batch=batch, **dims, impl=impl, block_p=block_p,
                       num_warps=num_warps, state_dtype=state_dtype.name,
                       us_per_step=round(ms * 1e3, 3),
                       copy_fraction=round(state_bytes / (ms * 1e-3) / COPY_BYTES_PER_S, 3)))
      print(rows[-1], flush=True)
  for row in rows:
    base = next(r["us_per_step"] for r in rows if r["impl"] == "xla"
                and (r["model"], r["batch"]) == (row["model"], row["batch"]))
    row["xla_over_this"] = round(base / row["us_per_step"], 3)
  print(f"\n| model | batch | impl | block_p | warps | µs / step | copy ceiling | xla / this |\n"
        f"|---|---|---|---|---|---|---|---|")
  for r in rows:
    default = (r["impl"] == "pallas"
               and (r["block_p"], r["num_warps"]) == default_blocks(r["batch"], r["h"], r["p"]))
    print(f"| {r['model']} | {r['batch']} | {r['impl']}{' (default blocks)' * default} | "
          f"{r['block_p'] or '-'} | {r['num_warps'] or '-'} | {r['us_per_step']} | "
          f"{r['copy_fraction']:.0%} | {r['xla_over_this']} |")
  write_json(args.out, dict(section="decode_step", device=str(jax.devices()[0].device_kind),
                            env=environment(), args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
