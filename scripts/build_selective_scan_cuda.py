"""Build mamba_ssm's CUDA selective-scan extension (``selective_scan_cuda``), the baseline that
``scripts/bench_selective_scan.py`` and ``scripts/bench_kernels.py`` time our S6 kernels against.

Compiles only ``csrc/selective_scan`` of an unpacked ``mamba-ssm==2.3.2.post1`` sdist, with the
sdist's own nvcc flags, for one GPU architecture (default sm_90, Hopper), through
``torch.utils.cpp_extension.load`` (ninja, ``--jobs`` parallel compiles). Needs PyTorch with CUDA
and nvcc; the GPU machine has both (about 2 minutes on its 16 cores). The resulting
``selective_scan_cuda*.so`` lands in ``--out`` and is what ``--mamba_ssm_path`` takes.

Usage (on the GPU machine):
  python3 scripts/build_selective_scan_cuda.py --sdist .device/mamba_ssm-2.3.2.post1 \\
      --out .device/selective_scan_build
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time

NVCC_FLAGS = [
    "-O3", "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
]
SOURCES = ["selective_scan.cpp"] + [
    f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + [
    f"selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sdist", required=True, help="unpacked mamba-ssm sdist directory")
  parser.add_argument("--out", required=True, help="directory for selective_scan_cuda*.so")
  parser.add_argument("--arch", default="90", help="compute capability, e.g. 90 (sm_90)")
  parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
  args = parser.parse_args()

  src_dir = os.path.join(args.sdist, "csrc", "selective_scan")
  missing = [s for s in SOURCES if not os.path.exists(os.path.join(src_dir, s))]
  if missing:
    sys.exit(f"--sdist {args.sdist!r}: no {', '.join(missing)} under csrc/selective_scan; "
             "pass the unpacked mamba-ssm==2.3.2.post1 sdist")
  os.environ["MAX_JOBS"] = str(args.jobs)
  from torch.utils.cpp_extension import load  # torch only here: the project does not need it

  build_dir = os.path.join(args.out, "build")
  os.makedirs(build_dir, exist_ok=True)
  start = time.time()
  load(name="selective_scan_cuda", sources=[os.path.join(src_dir, s) for s in SOURCES],
       extra_cflags=["-O3", "-std=c++17"],
       extra_cuda_cflags=NVCC_FLAGS + [f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}"],
       extra_include_paths=[os.path.abspath(src_dir)], build_directory=build_dir, verbose=False)
  for so in glob.glob(os.path.join(build_dir, "selective_scan_cuda*.so")):
    shutil.copy(so, args.out)
  print(f"built selective_scan_cuda for sm_{args.arch} in {time.time() - start:.0f} s -> "
        f"{args.out}", flush=True)


if __name__ == "__main__":
  main()
