"""One driver for every benchmark of the report (docs/benchmarks.md): kernels, training, long
context, generation, CPU.

Sections (each in its own process, with a time limit; a failure, an out-of-memory error or a
timeout in one is recorded in the report and the others still run):

  kernels       scripts/bench_kernels.py      SSD / S6 / cuDNN attention vs length, SSD vs N
  training      scripts/bench_training.py     train-step tokens/s, MFU, peak memory; mamba_ssm
  generation    scripts/bench_generation.py   prompt 2048 + 128 tokens, ~130M models
  long_context  scripts/bench_long_context.py longest trainable / forward length, 130M
  cpu           scripts/bench_training.py --cpu   tiny models, compile and step time on 2
                cores (run when there is no GPU, or when named in --only)
In full mode the kernels are split into kernels (SSD and attention against length),
kernels_n (SSD against N) and kernels_s6 (S6 against length), the SSD cases without the XLA
chunked form (at 262,144 tokens per case its forward+backward asks for ~38 GiB in one
allocation and fails on an 80 GB H100, as every length did in the full run of 2026-11-22;
scripts/bench_ssd.py times it at 65,536), training by size (training_130m, training_370m,
training_1.4b), long context into long_context (train) and long_context_forward, and
generation_large adds the 1.4B / 1.3B models: each fits one call of < 10 minutes, e.g.
  for s in kernels kernels_n kernels_s6 training_130m training_370m training_1.4b generation \
           generation_large long_context long_context_forward: one call each with --only=$s
and the JSONs are merged by ``scripts/bench_report.py --json a.json b.json ...``.

Modes:
  --reduced   everything in one call of < 10 minutes on one H100 (a total deadline,
              ``--deadline_s``, default 560 s, shares the time among the sections)
  (default)   full sizes, one section per call (``--only``, below); ``--merge`` keeps the
              sections of an earlier results JSON that this call does not rerun
  --smoke     tiny shapes on CPU: checks that every section runs end to end

Output in ``--out`` (default $OUT, else ./bench_out): ``bench_results.json`` (every section's
data, its status, wall time and log tail, with the device, driver, library versions, date and
arguments), ``benchmarks.md`` and ``bench_*.png`` (scripts/bench_report.py, which can rebuild
them from the JSON alone). Five files at most, plus whatever log the caller tees.

GPU, one call (from the repository root, mamba_ssm's sdist and the training packages carried):
  PYTHONPATH=.:.device/training_site python scripts/bench_all.py --reduced --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_timing import environment, write_json  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("kernels", "kernels_n", "kernels_s6", "training", "training_130m", "training_370m",
            "training_1.4b", "generation", "generation_large", "long_context",
            "long_context_forward", "cpu")
# Measured on an H100 (reduced runs of 2026-11-22): generation ~98 s, long context ~76 s; the
# kernels need ~25 s per SSD implementation and length (compile included); training at 16K
# tokens per step ~45 s for our Mamba-2 130M, ~25 s for the Transformer++, ~140 s for mamba_ssm's
# PyTorch model (its first, autotuning, steps).
REDUCED_SHARES = {"kernels": 0.2, "training": 0.47, "generation": 0.18, "long_context": 0.15}
RESULTS = "bench_results.json"
FULL_SSD = "pallas,pallas_mgpu,triton"   # the full mode's SSD implementations (no chunked)

SIZES = {"130m": ("mamba-130m", "mamba2-130m", "transformerpp-125m"),
         "370m": ("mamba-370m", "mamba2-370m", "transformerpp-350m"),
         "1.4b": ("mamba-1.4b", "mamba2-1.3b", "transformerpp-1.3b")}


def training_cases(sizes, lengths, tokens_by_size) -> str:
  """model:length:impl:tokens for every size and length, mamba_ssm's Mamba-2 after ours."""
  cases = []
  for size in sizes:
    for length in lengths:
      tokens = tokens_by_size[size]
      for model in SIZES[size]:
        cases.append(f"{model}:{length}:jax:{tokens}")
        if model.startswith("mamba2"):
          cases.append(f"{model}:{length}:torch:{tokens}")
  return ",".join(cases)


def section_commands(mode: str) -> dict[str, list[str]]:
  """The command of each section (before its --out / --budget_s), by mode."""
  py = sys.executable
  script = lambda name: [py, os.path.join(SCRIPTS, name)]
  if mode == "smoke":
    return {
        "kernels": script("bench_kernels.py") + ["--smoke"],
        "training": script("bench_training.py") + [
            "--cpu", "--cases", "mamba2-130m:128:jax", "--tokens", "256", "--steps", "2",
            "--warmup", "1"],
        "generation": script("bench_generation.py") + [
            "--small", "--batches", "1", "--reps", "1", "--models", "mamba2-130m"],
        "long_context": script("bench_long_context.py") + [
            "--smoke", "--models", "mamba2-130m", "--max_length", "128"],
        "cpu": script("bench_training.py") + [
            "--cpu", "--cases", "mamba-130m:128:jax", "--tokens", "256", "--steps", "2",
            "--warmup", "1"],
    }
  if mode == "reduced":
    return {
        "kernels": script("bench_kernels.py") + [
            "--tokens", "65536", "--lengths", "2048,32768", "--parts", "lengths,s6",
            "--ssd_impls", "pallas_mgpu,triton",
            "--s6_lengths", "4096", "--s6_d_inner", "2048", "--s6_impls", "pallas,pallas_mgpu",
            "--reps", "10", "--inner", "2"],
        "training": script("bench_training.py") + [
            "--cases", "mamba2-130m:2048:jax,transformerpp-125m:2048:jax,mamba2-130m:2048:torch",
            "--tokens", "16384", "--steps", "8", "--warmup", "2"],
        "generation": script("bench_generation.py") + ["--batches", "1,64", "--reps", "2"],
        "long_context": script("bench_long_context.py") + [
            "--start", "262144", "--max_length", "262144"],
        "cpu": script("bench_training.py") + ["--cpu", "--steps", "5"],
    }
  full = {
      "kernels": script("bench_kernels.py") + ["--parts", "lengths", "--ssd_impls", FULL_SSD],
      "kernels_n": script("bench_kernels.py") + ["--parts", "states", "--ssd_impls", FULL_SSD],
      "kernels_s6": script("bench_kernels.py") + ["--parts", "s6"],
      "generation": script("bench_generation.py"),
      "generation_large": script("bench_generation.py") + [
          "--large", "--prefill_chunk", "64", "--chunk_from_batch", "128"],
      "long_context": script("bench_long_context.py") + ["--modes", "train"],
      "long_context_forward": script("bench_long_context.py") + ["--modes", "forward"],
      "cpu": script("bench_training.py") + ["--cpu"],
  }
  for size, tokens in (("130m", 32768), ("370m", 32768), ("1.4b", 16384)):
    full[f"training_{size}"] = script("bench_training.py") + [
        "--cases", training_cases((size,), (2048, 8192), {size: tokens}), "--case_s", "400"]
  return full


def run_section(name: str, cmd: list[str], out_json: str, timeout: float,
                env: dict[str, str]) -> dict:
  """Runs one section in its own process group, streaming its output; kills it at timeout."""
  print(f"\n=== {name}: {' '.join(cmd)} (limit {timeout:.0f} s)", flush=True)
  start = time.perf_counter()
  tail: list[str] = []
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, start_new_session=True)

  def pump():
    for line in proc.stdout:
      print(f"[{name}] {line.rstrip()}", flush=True)
      tail.append(line.rstrip())
      del tail[:-40]

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  status = None
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    status = "timeout"
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group only
      proc.wait()
  reader.join(timeout=10)
  data = None
  if os.path.exists(out_json):
    with open(out_json) as f:
      data = json.load(f)
  if status is None:
    status = "ok" if proc.returncode == 0 else "failed"
  wall = time.perf_counter() - start
  print(f"=== {name}: {status} in {wall:.0f} s", flush=True)
  return dict(status=status, returncode=proc.returncode, wall_s=wall, limit_s=timeout,
              command=cmd, data=data, log_tail="\n".join(tail)[-4000:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--reduced", action="store_true")
  group.add_argument("--smoke", action="store_true")
  parser.add_argument("--only", default="", help=f"comma-separated sections of {SECTIONS}")
  parser.add_argument("--deadline_s", type=float, default=None,
                      help="all sections together (reduced: 560, smoke: 600, full: none)")
  parser.add_argument("--section_s", type=float, default=590,
                      help="the longest any one section may run (full mode)")
  parser.add_argument("--merge", default="", help="an earlier bench_results.json to extend")
  parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
  args = parser.parse_args()
  mode = "smoke" if args.smoke else "reduced" if args.reduced else "full"
  start = time.perf_counter()
  deadline_s = args.deadline_s or {"reduced": 560.0, "smoke": 600.0}.get(mode, 1e9)
  os.makedirs(args.out, exist_ok=True)
  env_info = environment()
  has_gpu = env_info["gpu"] is not None
  json_dir = tempfile.mkdtemp(prefix="bench_all_")
  commands = section_commands(mode)
  if args.only:
    names = args.only.split(",")
    unknown = sorted(set(names) - set(commands))
    if unknown:
      raise ValueError(f"--only: {unknown} not among this mode's sections {sorted(commands)}")
  else:
    names = [n for n in SECTIONS if n in commands and (n != "cpu" or not has_gpu or
                                                        mode == "smoke")]
    if not has_gpu and mode != "smoke":
      names = ["cpu"]  # the GPU sections need a GPU; CPU numbers are what this machine gives
  results = dict(mode=mode, env=env_info, args=vars(args), sections={})
  if args.merge:
    with open(args.merge) as f:
      results["sections"] = json.load(f).get("sections", {})

  child_env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  reserve = 20.0  # for the report
  for i, name in enumerate(names):
    left = deadline_s - (time.perf_counter() - start) - reserve
    if left < 30:
      results["sections"][name] = dict(status="skipped", reason="driver deadline")
      continue
    if mode == "reduced":
      # the section's share of what is left, its unspent time passing to those after it
      shares = [REDUCED_SHARES.get(n, 0.1) for n in names[i:]]
      timeout = left * shares[0] / sum(shares)
    else:
      timeout = min(left, args.section_s)
    out_json = os.path.join(json_dir, f"{name}.json")
    cmd = commands[name] + ["--out", out_json]
    env = dict(child_env)
    if name == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      if shutil.which("taskset") and (os.cpu_count() or 1) > 2:
        cmd = ["taskset", "-c", "0,1"] + cmd
    cmd += ["--budget_s", str(max(timeout - 25, 10))]  # stop starting cases before the limit
    results["sections"][name] = run_section(name, cmd, out_json, timeout, env)
    results["elapsed_s"] = time.perf_counter() - start
    write_json(os.path.join(args.out, RESULTS), results)
  shutil.rmtree(json_dir, ignore_errors=True)
  results["elapsed_s"] = time.perf_counter() - start
  path = os.path.join(args.out, RESULTS)
  write_json(path, results)
  import bench_report
  written = bench_report.build(results, os.path.join(args.out, "benchmarks.md"), args.out)
  print(f"\nwrote {path} and {', '.join(written)} in {results['elapsed_s']:.0f} s", flush=True)
  for name, sec in results["sections"].items():
    print(f"  {name}: {sec['status']} ({sec.get('wall_s', 0):.0f} s)")


if __name__ == "__main__":
  main()
