"""Memory-traffic floor of a decoding step, and the Mamba / Transformer++ speed-up it allows.

A decoding step at batch b is bound by memory traffic, not FLOPs (130M parameters, b = 128:
33 GFLOP, 0.05 ms of an H100's tensor cores, against ~1–3 ms of reads). Each step reads every
weight once and, per sequence,

  SSM layers:        reads and writes the whole recurrent state (conv + SSM state):
                     2 · state_bytes, whatever the context
  attention layers:  reads the keys and values of the positions so far and writes one
                     position's: kv_bytes_per_position · (context + 1)

so bytes(step) = weight_bytes + b · per_sequence(context). Averaged over a generation of
``gen_len`` tokens after a ``prompt_len`` prompt (contexts prompt_len … prompt_len + gen_len − 2
for the gen_len − 1 decoding steps), and divided by the device's copy bandwidth (PERF.md's
measured H100 ceiling, 3.0 TB/s), it gives floor_ms_step: no implementation of that model and
batch decodes faster. The ratio of two models' floors is the largest throughput ratio that
implementations equally close to their floors can show: ``bound_vs_transformer`` = the
Transformer++'s floor / the model's.

Everything is computed from shapes (``nnx.eval_shape`` for the weights, ``state_nbytes`` for
the caches): nothing is allocated, so the 1.4B presets run on a CPU in seconds. With
``--measured`` (JSON files of ``bench_generation.py``), each measured row gains
``floor_ms_step``, ``pct_of_floor`` = floor / measured step and ``bound_vs_transformer`` next to
its measured ``vs_transformer``.

Usage:
  PYTHONPATH=. python scripts/decode_traffic_bound.py \
      --measured docs/results/generation_130m_h100.json --out /tmp/decode_bound.json
Prints a markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_timing import environment, write_json  # noqa: E402
from mamba_jax.config import MambaConfig, preset  # noqa: E402
from mamba_jax.inference.cache import state_nbytes  # noqa: E402
from mamba_jax.nn.lm import MambaLM  # noqa: E402

COPY_BYTES_PER_S = 3.0e12  # PERF.md: the H100's measured device-copy ceiling
TRANSFORMER = "transformerpp"
MODELS = ("mamba-130m", "mamba2-130m", "transformerpp-125m",
          "mamba-1.4b", "mamba2-1.3b", "transformerpp-1.3b")
MIB = 2 ** 20


@functools.lru_cache(maxsize=None)
def weight_bytes(name: str, dtype: str) -> int:
  """Bytes of the preset's parameters in ``dtype`` (abstract: nothing is allocated)."""
  config = preset(name)
  shapes = nnx.eval_shape(lambda: MambaLM(config, dtype=jnp.dtype(dtype),
                                          param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
  return sum(int(p.size) * jnp.dtype(p.dtype).itemsize
             for p in jax.tree.leaves(nnx.state(shapes, nnx.Param)))


def per_sequence_bytes(config: MambaConfig, dtype, state_dtype) -> tuple[int, int]:
  """(recurrent-state bytes, KV bytes per position) of one sequence's decoding cache."""
  one = state_nbytes(config, 1, 1, dtype, state_dtype)
  two = state_nbytes(config, 1, 2, dtype, state_dtype)
  per_position = two - one
  return one - per_position, per_position


def step_bytes(config: MambaConfig, weights: int, batch: int, prompt_len: int, gen_len: int,
               dtype, state_dtype) -> float:
  """Bytes a decoding step must move, averaged over the generation (module docstring)."""
  if batch < 1 or prompt_len < 1 or gen_len < 2:
    raise ValueError(f"need batch >= 1, prompt_len >= 1 and gen_len >= 2, got {batch=}, "
                     f"{prompt_len=}, {gen_len=}")
  state, per_position = per_sequence_bytes(config, dtype, state_dtype)
  mean_context = prompt_len + (gen_len - 2) / 2
  return weights + batch * (2 * state + per_position * (mean_context + 1))


def bound_rows(names, batches, prompt_len: int, gen_len: int, dtype: str,
               state_dtype: str) -> list[dict]:
  """One row per (model, batch): step bytes, floor and the bound on the ratio."""
  rows = []
  for batch in batches:
    for name in names:
      config = preset(name)
      total = step_bytes(config, weight_bytes(name, dtype), batch, prompt_len, gen_len,
                         jnp.dtype(dtype), jnp.dtype(state_dtype))
      rows.append(dict(model=name, batch=batch, step_mib=round(total / MIB, 1),
                       floor_ms_step=round(total / COPY_BYTES_PER_S * 1e3, 4)))
  add_bounds(rows)
  return rows


def _family(name: str) -> str:
  """'130m' or 'large': the size class a model is compared within."""
  return "130m" if name.endswith(("130m", "125m")) else "large"


def add_bounds(rows: list[dict]) -> None:
  """bound_vs_transformer: the same-size Transformer++'s floor over the row's."""
  base = {(_family(r["model"]), r["batch"]): r["floor_ms_step"] for r in rows
          if r["model"].startswith(TRANSFORMER)}
  for r in rows:
    key = (_family(r["model"]), r["batch"])
    r["bound_vs_transformer"] = (round(base[key] / r["floor_ms_step"], 2) if key in base
                                 else None)


def annotate_measured(path: str) -> list[dict]:
  """``bench_generation.py`` rows with their floor, % of it and the bound on the ratio."""
  with open(path) as f:
    result = json.load(f)
  out = []
  for r in result["rows"]:
    if "error" in r:
      continue
    state_dtype = r["state_dtype"] if r["state_dtype"] != "-" else result["dtype"]
    total = step_bytes(preset(r["model"]), weight_bytes(r["model"], result["dtype"]),
                       r["batch"], r["prompt_len"], r["gen_len"], jnp.dtype(result["dtype"]),
                       jnp.dtype(state_dtype))
    floor = total / COPY_BYTES_PER_S * 1e3
    out.append(dict(source=os.path.basename(path), model=r["model"], batch=r["batch"],
                    state_dtype=r["state_dtype"], decode_ms_step=r["decode_ms_step"],
                    floor_ms_step=round(floor, 4),
                    pct_of_floor=round(100 * floor / r["decode_ms_step"], 1),
                    vs_transformer=r.get("vs_transformer")))
  by_key = {(r["source"], _family(r["model"]), r["batch"]): r["floor_ms_step"] for r in out
            if r["model"].startswith(TRANSFORMER)}
  for r in out:
    key = (r["source"], _family(r["model"]), r["batch"])
    r["bound_vs_transformer"] = (round(by_key[key] / r["floor_ms_step"], 2) if key in by_key
                                 else None)
  return out


def markdown(rows: list[dict], cols: tuple[str, ...]) -> str:
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batches", default="1,16,64,128")
  parser.add_argument("--prompt_len", type=int, default=2048)
  parser.add_argument("--gen_len", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--state_dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--measured", default="",
                      help="comma-separated bench_generation.py JSON files to annotate")
  parser.add_argument("--out", default="decode_traffic_bound.json")
  args = parser.parse_args()
  rows = bound_rows(args.models.split(","), [int(b) for b in args.batches.split(",")],
                    args.prompt_len, args.gen_len, args.dtype, args.state_dtype)
  print(markdown(rows, ("model", "batch", "step_mib", "floor_ms_step",
                        "bound_vs_transformer")))
  measured = [row for path in filter(None, args.measured.split(","))
              for row in annotate_measured(path)]
  if measured:
    print()
    print(markdown(measured, ("source", "model", "batch", "state_dtype", "decode_ms_step",
                              "floor_ms_step", "pct_of_floor", "vs_transformer",
                              "bound_vs_transformer")))
  write_json(args.out, dict(section="decode_traffic_bound", env=environment(), args=vars(args),
                            copy_bytes_per_s=COPY_BYTES_PER_S, rows=rows, measured=measured))


if __name__ == "__main__":
  main()
