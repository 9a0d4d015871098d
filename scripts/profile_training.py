"""Where the time of one training step goes: a profiler trace of the step, summed per part of
the model.

For each case ``model:length:memory`` (memory ``plain``, ``chunked_loss`` or ``remat``, as in
``bench_training.py``): the same setup as ``bench_training.py`` (random tokens, float32
parameters, ``--dtype`` compute, AdamW, ``make_train_step``), compiled once, run ``--warmup``
times, timed over ``--steps`` steps (median wall ms), then one step under
``jax.profiler.trace``. Each GPU kernel of the trace is traced back to the HLO instruction that
launched it (for XLA's fusions the kernel's own name; for library kernels the profiler's
``hlo_op``, which inside a command buffer names only the buffer) and from there to the
instruction's ``op_name``: the jax name stack, whose NNX module scopes
(``mamba_lm/block/mamba2_mixer/...``) and named scopes (``ssd_chunked``, ...) say which part of
the model it computes, and whose ``transpose(...)`` says it is the backward. Reported per
case: wall and GPU-busy ms per step, kernels per step, the busy time by kernel kind
(:func:`kernel_kind`) and summed per (direction, part) to ``--depth`` scopes, and the ``--top``
kernels.

Usage (GPU): PYTHONPATH=. python scripts/profile_training.py \
    --cases mamba2-130m:2048:plain,transformerpp-125m:2048:plain --out /tmp/train_profile.json
CPU smoke (tiny models; no device events on a CPU, the timing rows are still written):
  python scripts/profile_training.py --small --out /tmp/train_profile.json
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Without preallocation jax's GPU allocator still stops at 75 % of the memory (59.4 GiB of an
# H100 80GB); the models here may use 95 % (75.2 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402

from bench_timing import environment, parse_auto_as, time_ms, write_json  # noqa: E402
from bench_training import jax_train_setup  # noqa: E402
from trace_events import device_events  # noqa: E402
from mamba_jax.ops.impl import resolve_auto_as  # noqa: E402
from mamba_jax.training.train_step import make_train_step  # noqa: E402

# Name-stack entries that say how an op is computed rather than what it computes.
_TRANSFORM_SCOPES = ("jit", "jvp", "transpose", "checkpoint", "remat", "rematted_computation",
                     "while", "body", "cond", "eval_jaxpr", "vmap", "custom_vjp_call",
                     "custom_jvp_call", "pjit", "step", "train_step")


def instruction_op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name, with '.' and '-' as '_' (as XLA names its kernels): op_name} for
  every instruction of the compiled module's text that carries an op_name; also the
  ``deduplicated_name`` that identical fusions (e.g. of every layer) share as one kernel."""
  names = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"([^\n]*)",
                       hlo_text, re.MULTILINE):
    names[re.sub(r"[.\-]", "_", m.group(1))] = m.group(2)
    # Identical fusions share one kernel, named after the first (its deduplicated_name).
    shared = re.search(r'deduplicated_name="([^"]+)"', m.group(3))
    if shared:
      names.setdefault(re.sub(r"[.\-]", "_", shared.group(1)), m.group(2))
  return names


def part_of(op_name: str, depth: int) -> tuple[str, str]:
  """(direction, part) of an op_name: direction "bwd" under a ``transpose(...)``, "remat"
  for a rematerialized forward, else "fwd"; part = the first ``depth`` scopes of the name
  stack with the transformations unwrapped (``transpose(jvp(mamba_lm))`` → ``mamba_lm``) and
  the primitive (the last entry) dropped."""
  direction = ("bwd" if "transpose(" in op_name
               else "remat" if "rematted_computation" in op_name else "fwd")
  scopes = []
  for entry in op_name.split("/")[:-1]:
    inner = entry
    while (m := re.fullmatch(r"[\w\-]+\((.*)\)", inner)):  # jvp(x), transpose(jvp(x)), ...
      inner = m.group(1)
    if inner and inner not in _TRANSFORM_SCOPES and not inner.startswith("jit("):
      scopes.append(inner)
  return direction, "/".join(scopes[:depth]) or "(top level)"


def kernel_kind(kernel: str) -> str:
  """A GPU kernel's kind from its name: "matmul" (cuBLAS / XLA's Triton GEMMs), "attention"
  (cuDNN), "transpose", "reduce" or "elementwise" (XLA fusions by their name), "memset", or
  "custom" (everything else: the Pallas kernels, named after their functions)."""
  if re.search(r"gemm|xmma|nvjet|cublas|cutlass", kernel):
    return "matmul"
  if "cudnn" in kernel:
    return "attention"
  if kernel.startswith("Memset"):
    return "memset"
  if re.match(r"(loop|input|wrapped|fusion|copy|concatenate|slice|transpose|dynamic)", kernel):
    return ("transpose" if "transpose" in kernel else "reduce" if "reduce" in kernel
            else "elementwise")
  return "custom"


def profile_case(case: str, args: argparse.Namespace) -> dict:
  """Timing and per-part kernel summary of one ``model:length:memory`` training step."""
  name, length, memory = case.split(":")
  length = int(length)
  if memory not in ("plain", "chunked_loss", "remat"):
    raise ValueError(f"--cases: memory of {case!r} must be 'plain', 'chunked_loss' or 'remat'")
  setup = jax_train_setup(name, length, args.tokens, args.small, args.dtype)
  remat = memory == "remat"
  loss_chunk = args.loss_chunk if memory != "plain" else 0
  step = make_train_step(setup.graphdef, setup.rest, setup.tx, setup.config.vocab_size,
                         remat=remat, loss_chunk=loss_chunk)
  start = time.perf_counter()
  compiled = step.lower(setup.state, setup.data).compile()
  compile_s = time.perf_counter() - start
  hlo_text = compiled.as_text()
  op_names = instruction_op_names(hlo_text)
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    with open(os.path.join(args.hlo_dir, case.replace(":", "_") + ".hlo.txt"), "w") as f:
      f.write(hlo_text)
  holder = {"state": setup.state}
  data = setup.data
  del setup

  def run():
    holder["state"], metrics = compiled(holder["state"], data)
    return metrics["loss"]

  wall_ms = time_ms(run, jax.block_until_ready, reps=args.steps, inner=1, warmup=args.warmup)
  with tempfile.TemporaryDirectory(prefix="train_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(run())
    try:
      events = device_events(trace_dir)
    except FileNotFoundError:
      events = []
  parts: dict[tuple[str, str], float] = collections.defaultdict(float)
  kernels: dict[str, float] = collections.defaultdict(float)
  kernel_op: dict[str, str] = {}
  kinds: dict[str, float] = collections.defaultdict(float)
  unmatched_us = 0.0
  for e in events:
    op_name = op_names.get(re.sub(r"[.\-]", "_", e["name"]))
    if op_name is None:  # a library's kernel (cuBLAS, cuDNN): the HLO op that launched it
      op_name = op_names.get(re.sub(r"[.\-]", "_", str(e["args"].get("hlo_op", ""))))
    kernels[e["name"]] += e["dur"]
    kinds[kernel_kind(e["name"])] += e["dur"]
    if op_name is None:
      unmatched_us += e["dur"]
      parts[("?", f"kernel {e['name'][:60]}")] += e["dur"]
    else:
      kernel_op.setdefault(e["name"], op_name)
      parts[part_of(op_name, args.depth)] += e["dur"]
  busy_us = sum(kernels.values())
  by_part = sorted(parts.items(), key=lambda kv: -kv[1])
  top = sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]
  return dict(
      case=case, model=name, length=length, memory=memory, tokens=args.tokens,
      dtype=args.dtype, loss_chunk=loss_chunk,
      compile_s=round(compile_s, 2), wall_ms_per_step=round(wall_ms, 3),
      busy_ms_per_step=round(busy_us / 1e3, 3) if events else None,
      kernels_per_step=len(events) if events else None,
      unmatched_ms=round(unmatched_us / 1e3, 3) if events else None,
      kinds_ms={k: round(v / 1e3, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
      parts_ms=[(direction, part, round(us / 1e3, 3)) for (direction, part), us in by_part
                if us >= args.min_part_us],
      top_kernels_ms=[(k, round(v / 1e3, 3), kernel_op.get(k, "")) for k, v in top])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="mamba2-130m:2048:plain",
                      help="comma-separated model:length:memory, memory plain, chunked_loss "
                           "(the LM head and loss --loss_chunk positions at a time) or remat "
                           "(also each block rematerialized)")
  parser.add_argument("--tokens", type=int, default=32768, help="tokens per step")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--loss_chunk", type=int, default=8192,
                      help="positions of logits at a time with memory chunked_loss / remat")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--depth", type=int, default=4, help="name-stack scopes of a part")
  parser.add_argument("--top", type=int, default=25, help="kernels listed per case")
  parser.add_argument("--min_part_us", type=float, default=50.0,
                      help="parts below this many µs per step are left out of the JSON")
  parser.add_argument("--small", action="store_true",
                      help="tiny models as bench_training.py --cpu (d 256, 4 layers, vocab 256)")
  parser.add_argument("--hlo_dir", default="",
                      help="also write each case's optimized HLO text here")
  parser.add_argument("--auto_as", default="",
                      help="op=impl,... : what impl='auto' of each named op resolves to "
                           "(mamba_jax.ops.impl.resolve_auto_as), as bench_training.py's")
  parser.add_argument("--out", default="train_profile.json")
  args = parser.parse_args()
  if args.small:
    args.tokens, args.steps, args.warmup = 512, 2, 1
    args.cases = ",".join(f"{c.split(':')[0]}:128:{c.split(':')[2]}"
                          for c in args.cases.split(","))
  rows = []
  for case in args.cases.split(","):
    with resolve_auto_as(**parse_auto_as(args.auto_as)):
      row = profile_case(case, args)
    rows.append(row)
    print(f"{case}: wall {row['wall_ms_per_step']} ms/step, GPU busy {row['busy_ms_per_step']}"
          f" ms/step, {row['kernels_per_step']} kernels/step, unmatched "
          f"{row['unmatched_ms']} ms; compile {row['compile_s']} s", flush=True)
    print("  by kind:", row["kinds_ms"])
    for direction, part, ms in row["parts_ms"]:
      print(f"  {ms:9.3f} ms  {direction:5s} {part}")
    for kernel, ms, op_name in row["top_kernels_ms"]:
      print(f"  {ms:9.3f} ms  {kernel[:60]:60s} {op_name[-90:]}")
    jax.clear_caches()
  write_json(args.out, dict(section="training_profile",
                            device=str(jax.devices()[0].device_kind), env=environment(),
                            args=vars(args), rows=rows))


if __name__ == "__main__":
  main()
