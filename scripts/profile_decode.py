"""Where the time of one decoding loop goes: a profiler trace of ``_decode``, summed per kernel.

For each model: random weights in ``--dtype``, a prompt of ``--prompt_len`` random tokens
prefilled, the compiled decoding loop (``mamba_jax.inference.decode._decode``, greedy) run once
to warm up and once under ``jax.profiler.trace``. From the trace's device events: the GPU's busy
time per generated token, how many kernels run per token, and the kernels that take most of the
time (summed over the loop, per token). Wall time per token beside busy time shows how much of a
step is launch and host overhead rather than kernel work. ``--option_sets`` compiles the same
loop with each set of XLA options in turn (one row each), to compare them in one process;
``--step_impls auto,xla,pallas`` compiles it with the ops of ``decode.STEP_KERNEL_OPS`` as
``impl="auto"`` picks them, all in their XLA forms, and all as Pallas kernels, one row each.

Usage (GPU): PYTHONPATH=. python scripts/profile_decode.py --models mamba-1.4b,transformerpp-1.3b \
    --batches 1,64 --out /tmp/decode_profile.json
(an option set names only options that the installed XLA takes as compile options: jaxlib
0.11.2's CUDA plugin refuses e.g. xla_gpu_enable_dot_strength_reduction, "No such compile
option").
CPU smoke: python scripts/profile_decode.py --small --out /tmp/decode_profile.json
(on a CPU the trace has no device events; the timing rows are still written).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Without preallocation jax's GPU allocator still stops at 75 % of the memory (59.4 GiB of an
# H100 80GB); the models here may use 95 % (75.2 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_generation import has_ssm, small_config  # noqa: E402
from bench_timing import environment, write_json  # noqa: E402
from trace_events import device_events  # noqa: E402
from mamba_jax.config import preset  # noqa: E402
from mamba_jax.inference.decode import STEP_KERNEL_OPS, _decode  # noqa: E402
from mamba_jax.inference.generate import jit_prefill  # noqa: E402
from mamba_jax.inference.sampling import SamplingParams  # noqa: E402
from mamba_jax.nn.lm import MambaLM  # noqa: E402
from mamba_jax.ops.impl import resolve_auto_as  # noqa: E402


def device_kernel_times(trace_dir: str) -> tuple[dict[str, float], int]:
  """({kernel name: summed µs}, event count) over the device-stream events of the perfetto
  trace that ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote under trace_dir."""
  times: dict[str, float] = collections.defaultdict(float)
  events = device_events(trace_dir)
  for e in events:
    times[e["name"]] += e["dur"]
  return dict(times), len(events)


def parse_option_sets(text: str) -> list[dict]:
  """--option_sets: ";"-separated sets of ","-separated XLA options KEY=VALUE ("default" or
  an empty set: none); values true / false / integers are converted."""
  sets = []
  for group in text.split(";"):
    options = {}
    for item in filter(None, (x.strip() for x in group.split(","))):
      if item == "default":
        continue
      key, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--option_sets item {item!r} must be KEY=VALUE")
      low = value.lower()
      options[key] = (low == "true") if low in ("true", "false") else (
          int(value) if value.lstrip("-").isdigit() else value)
    sets.append(options)
  return sets


def profile_one(name: str, model: MambaLM, batch: int, options: dict,
                args: argparse.Namespace) -> dict:
  """Timing and kernel summary of one model's decoding loop at one batch size, compiled with
  the XLA ``options`` (see the module docstring)."""
  ids = jax.random.randint(jax.random.key(0), (batch, args.prompt_len), 0,
                           model.config.vocab_size, jnp.int32)
  graphdef, state = nnx.split(model)
  key = jax.random.key(0)

  def prefill():
    return jax.block_until_ready(
        jit_prefill(model, ids, max_length=args.prompt_len + args.gen_len, chunk_size=None,
                    state_dtype=jnp.dtype(args.state_dtype)))

  logits, cache = prefill()
  compiled = _decode.lower(graphdef, state, cache, logits, None, key,
                           max_new_tokens=args.gen_len, params=SamplingParams(),
                           eos_id=None, callback=None).compile(compiler_options=options or None)
  jax.block_until_ready(compiled(state, cache, logits, None, key))   # warm-up
  logits, cache = prefill()
  start = time.perf_counter()
  tokens, _, steps = compiled(state, cache, logits, None, key)
  jax.block_until_ready(tokens)
  wall_ms = (time.perf_counter() - start) * 1e3
  logits, cache = prefill()
  trace_dir = tempfile.mkdtemp(prefix="decode_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(compiled(state, cache, logits, None, key)[0])
  steps = max(int(steps) - 1, 1)   # model steps: the last token is not fed back
  try:
    times, count = device_kernel_times(trace_dir)
  except FileNotFoundError:
    times, count = {}, 0
  busy_us = sum(times.values())
  top = sorted(times.items(), key=lambda kv: -kv[1])[:args.top]
  return dict(model=name, batch=batch, options=options, prompt_len=args.prompt_len,
              gen_len=args.gen_len, state_dtype=args.state_dtype,
              n_layer=model.config.n_layer,
              wall_ms_per_token=round(wall_ms / steps, 4),
              busy_ms_per_token=round(busy_us / 1e3 / steps, 4) if times else None,
              kernels_per_token=round(count / steps, 1) if times else None,
              top_kernels_us_per_token=[(k, round(v / steps, 2)) for k, v in top])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mamba-1.4b,mamba2-1.3b,transformerpp-1.3b")
  parser.add_argument("--batches", default="1")
  parser.add_argument("--option_sets", default="default",
                      help='";"-separated sets of XLA compile options KEY=VALUE,... to '
                           'compare ("default": none)')
  parser.add_argument("--step_impls", default="auto",
                      help='comma-separated: "auto" (the decoding ops as impl="auto" picks '
                           'them), "xla" (all XLA forms), "pallas" (all Pallas kernels)')
  parser.add_argument("--prompt_len", type=int, default=2048)
  parser.add_argument("--gen_len", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--state_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="storage dtype of the SSM states in the cache")
  parser.add_argument("--top", type=int, default=15, help="kernels listed per model")
  parser.add_argument("--small", action="store_true", help="reduced models (CPU smoke)")
  parser.add_argument("--out", default="decode_profile.json")
  args = parser.parse_args()
  if args.small:
    args.prompt_len, args.gen_len = 32, 8
  dtype = jnp.dtype(args.dtype)
  rows = []
  for name in args.models.split(","):
    config = small_config(name) if args.small else preset(name)
    if jax.default_backend() == "gpu" and config.attn_layer_idx:
      config = config.replace(attn_cfg={**config.attn_cfg, "implementation": "cudnn"})
    model = MambaLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    for batch, options, step_impl in itertools.product(
        [int(b) for b in args.batches.split(",")], parse_option_sets(args.option_sets),
        args.step_impls.split(",")):
      if step_impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"--step_impls: {step_impl!r} is not 'auto', 'xla' or 'pallas'")
      if step_impl != "auto" and not has_ssm(config):
        continue  # no decoding kernel to choose: the "auto" row is the same program
      jax.clear_caches()  # the choice is made when _decode is traced
      with resolve_auto_as(**{op: step_impl for op in STEP_KERNEL_OPS if step_impl != "auto"}):
        row = dict(profile_one(name, model, batch, options, args), step_impl=step_impl)
      rows.append(row)
      print(f"{name} batch {batch} step {step_impl} {options or 'default options'}: wall "
              f"{row['wall_ms_per_token']} ms/token, GPU busy {row['busy_ms_per_token']} "
            f"ms/token, {row['kernels_per_token']} kernels/token", flush=True)
      for kernel, us in row["top_kernels_us_per_token"]:
        print(f"  {us:9.2f} us  {kernel[:110]}")
    del model
  write_json(args.out, dict(section="decode_profile", device=str(jax.devices()[0].device_kind),
                            env=environment(), args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
