"""Generation benchmark: Mamba-1, Mamba-2 and Transformer++ of the same size, random weights.

For each model, batch size and (SSM models) SSM-state dtype: a prompt of ``--prompt_len``
random tokens, prefilled in parallel (``mamba_jax.inference.jit_prefill``; in one pass, or in
pieces of ``--prefill_chunk`` tokens from batch ``--chunk_from_batch`` on; Transformer++'s
first piece runs cuDNN flash attention on GPUs, its later pieces and decode steps XLA over
the KV cache), then ``--gen_len`` tokens decoded greedily by the compiled ``while_loop``
(``mamba_jax.inference.decode``, donated cache).

SSM-state dtype (``--state_dtype``, a comma list, one row each): float32 is the exact
default; bfloat16 stores the states as mamba_ssm does for a bf16 model (half the bytes each
decoding step reads and writes; every update still computed in float32). A bfloat16 row's
cache is the float32 prefill's converted by ``astype_states`` (exactly what
``jit_prefill(..., state_dtype=bfloat16)`` returns, without compiling the prefill twice);
its prefill_ms includes the conversion. Conv states and KV caches are in ``--dtype``
(Transformer++ rows: state_dtype "-").

Each row: the prefill compiled and run once (its cache warms the compiled decode up), then
``--reps`` times a timed prefill followed by a timed decode from its cache. Reported per row:

  prefill_ms         the prompt's parallel pass (median)
  decode_ms_step     decode time / (gen_len − 1) steps (the first token comes from the
                     prefill's logits): latency per token
  decode_tok_s       batch · gen_len / decode time
  e2e_tok_s          batch · gen_len / (prefill + decode)
  state_mib          the decoding state (SSM states or KV cache of prompt + gen_len slots)
  decode_prog_mib    the decode program's arguments + temporaries (XLA memory analysis)
  peak_mib           the device's peak_bytes_in_use so far (process-wide, monotone;
                     ``device.memory_stats()``, absent on CPU)
  vs_transformer     decode_tok_s / the Transformer++'s at the same batch

and a second table: the decoding-state size at batch 1 against context length (2K to 64K),
constant for the SSMs and linear for attention, from shapes alone (``state_nbytes``) and, on
devices with memory statistics, measured: the growth of ``bytes_in_use`` when an empty cache
(``init_cache``) of that length is allocated (``<model>_measured``).
Compilation is excluded from every timing (one warm-up call per shape). The JSON is rewritten
after every row, so a run cut short keeps what it measured; ``--budget_s`` skips (and lists)
the rows that would start after that many seconds.

Usage:
  PYTHONPATH=. python scripts/bench_generation.py --out gen.json            # ~130M, GPU
  PYTHONPATH=. python scripts/bench_generation.py --large --out gen.json    # 1.4B / 1.3B
  PYTHONPATH=. python scripts/bench_generation.py --small                   # CPU smoke check

``--large`` prefills in one piece at every batch unless --chunk_from_batch is given. At batch
128 Transformer++ 1.3B's 51 GiB KV cache leaves room (75 GiB allowed on an 80 GB H100) neither
for one piece (13 GiB more asked) nor for 256-token pieces (21.5 GiB: XLA's cached attention
keeps several (b, h, piece, L) float32 arrays); ``--prefill_chunk 64 --chunk_from_batch 128``
fits, each piece one compiled call (``jit_prefill``), and is what ``bench_all.py``'s
generation_large section passes.

Time on an H100 (estimated from the 130M rows measured there: compiling takes most of it):
the 130M models at batches 1,64 with both state dtypes and --reps 2 about 100 s; --large at
batches 128,64,16,1 with --state_dtype bfloat16 --reps 1 about 4–5 min (prefill compilation
~10–25 s per 48-layer model and batch, decode ~5 s per row, Mamba-1 1.4B's prefill of 128 ×
2048 tokens several seconds). ``--budget_s`` bounds a run.

Imports only jax, flax and mamba_jax's model / inference modules (no grain, ml_collections).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import functools
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Without preallocation jax's GPU allocator still stops at 75 % of the memory (59.4 GiB of an
# H100 80GB); the models here may use 95 % (75.2 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_timing import environment, write_json  # noqa: E402
from mamba_jax.config import MambaConfig, preset  # noqa: E402
from mamba_jax.inference.cache import (astype_states, cache_nbytes, init_cache,  # noqa: E402
                                       state_nbytes)
from mamba_jax.inference.decode import _decode  # noqa: E402
from mamba_jax.inference.generate import jit_prefill  # noqa: E402
from mamba_jax.inference.sampling import SamplingParams  # noqa: E402
from mamba_jax.nn.lm import MambaLM  # noqa: E402
from mamba_jax.ops.checks import check_float_dtype  # noqa: E402

MODELS = {"base": ("mamba-130m", "mamba2-130m", "transformerpp-125m"),
          "large": ("mamba-1.4b", "mamba2-1.3b", "transformerpp-1.3b")}
TRANSFORMER = "transformerpp"
CONTEXTS = (2048, 4096, 8192, 16384, 32768, 65536)
MIB = 2 ** 20


def small_config(name: str) -> MambaConfig:
  """A reduced model of the same family for the CPU smoke check (d 128, 2–4 layers)."""
  config = preset(name)
  if name.startswith(TRANSFORMER):
    return config.replace(d_model=128, n_layer=2, d_intermediate=384,
                          attn_layer_idx=(0, 1), attn_cfg={**config.attn_cfg, "num_heads": 4,
                                                           "rotary_emb_dim": 32})
  ssm = dict(config.ssm_cfg)
  if ssm.get("layer") == "Mamba2":
    ssm.update(headdim=32, d_state=32, chunk_size=64)
  return config.replace(d_model=128, n_layer=4, ssm_cfg=ssm)


def _peak_mib() -> Optional[float]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use", 0) / MIB


def _in_use() -> Optional[int]:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_in_use", 0)


def has_ssm(config: MambaConfig) -> bool:
  """Whether some layer keeps an SSM state (not every layer is attention)."""
  return len(config.attn_layer_idx) < config.n_layer


def parse_state_dtypes(text: str) -> list[jnp.dtype]:
  """--state_dtype's comma list as dtypes, in order, without repeats."""
  dtypes = []
  for name in text.split(","):
    dtype = check_float_dtype("--state_dtype", name.strip())
    if dtype not in dtypes:
      dtypes.append(dtype)
  if not dtypes:
    raise ValueError(f"--state_dtype names no dtype: {text!r}")
  return dtypes


def measured_state_mib(model: MambaLM, context: int, dtype, state_dtype) -> Optional[float]:
  """Device bytes an empty cache of ``context`` positions (batch 1) takes, in MiB; None
  without memory statistics (CPU)."""
  before = _in_use()
  if before is None:
    return None
  cache = jax.block_until_ready(init_cache(model, 1, context, dtype, state_dtype))
  grown = _in_use() - before
  del cache
  return round(grown / MIB, 2)


@functools.partial(jax.jit, static_argnames="state_dtype", donate_argnames="cache")
def _astype_states(cache, state_dtype):
  return astype_states(cache, state_dtype)


def bench_one(name: str, model: MambaLM, batch: int, state_dtype: Optional[jnp.dtype],
              args: argparse.Namespace) -> dict:
  """Prefill + decode timings and memory of one model at one batch size; ``state_dtype``:
  the SSM states' storage dtype (None: no SSM layer)."""
  config = model.config
  n_params = sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  max_length = args.prompt_len + args.gen_len
  ids = jax.random.randint(jax.random.key(batch), (batch, args.prompt_len), 0,
                           config.vocab_size, jnp.int32)
  chunk = (args.prefill_chunk
           if batch >= args.chunk_from_batch and args.prefill_chunk < args.prompt_len
           else None)
  greedy, key = SamplingParams(), jax.random.key(0)
  graphdef, state = nnx.split(model)
  convert = state_dtype is not None and state_dtype != jnp.float32

  def run_prefill():
    logits, cache = jit_prefill(model, ids, max_length=max_length, chunk_size=chunk)
    return logits, (_astype_states(cache, state_dtype) if convert else cache)

  start = time.perf_counter()
  logits, cache = jax.block_until_ready(run_prefill())
  compile_prefill_s = time.perf_counter() - start
  state_bytes = cache_nbytes(cache)
  start = time.perf_counter()
  compiled = _decode.lower(graphdef, state, cache, logits, None, key,
                           max_new_tokens=args.gen_len, params=greedy, eos_id=None,
                           callback=None).compile()
  compile_decode_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  program_mib = (None if analysis is None else
                 (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / MIB)

  def run_decode(logits, cache) -> tuple[float, int]:
    """(ms of the compiled decoding loop, steps run); the cache is donated."""
    start = time.perf_counter()
    tokens, _, steps = compiled(state, cache, logits, None, key)
    jax.block_until_ready(tokens)
    return (time.perf_counter() - start) * 1e3, int(steps)

  run_decode(logits, cache)  # warm-up, from the first prefill's cache
  del logits, cache
  prefills, decodes = [], []
  for _ in range(args.reps):
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(run_prefill())
    prefills.append((time.perf_counter() - start) * 1e3)
    decodes.append(run_decode(logits, cache))
    del logits, cache
  prefill_ms = statistics.median(prefills)
  decode_ms = statistics.median(d[0] for d in decodes)
  steps = decodes[0][1]
  gen_tokens = batch * args.gen_len
  peak = _peak_mib()
  return dict(model=name, params_m=round(n_params / 1e6, 1), batch=batch,
              state_dtype="-" if state_dtype is None else jnp.dtype(state_dtype).name,
              prompt_len=args.prompt_len, gen_len=args.gen_len, steps=steps,
              prefill_ms=round(prefill_ms, 3), decode_ms=round(decode_ms, 3),
              decode_ms_step=round(decode_ms / max(steps - 1, 1), 4),
              decode_tok_s=round(gen_tokens / decode_ms * 1e3, 1),
              e2e_tok_s=round(gen_tokens / (prefill_ms + decode_ms) * 1e3, 1),
              state_mib=round(state_bytes / MIB, 2),
              decode_prog_mib=None if program_mib is None else round(program_mib, 1),
              peak_mib=None if peak is None else round(peak, 1),
              compile_prefill_s=round(compile_prefill_s, 1),
              compile_decode_s=round(compile_decode_s, 1))


def add_ratios(rows: list[dict]) -> None:
  """vs_transformer: decode tokens/s over the Transformer++'s at the same batch."""
  base = {r["batch"]: r["decode_tok_s"] for r in rows if r["model"].startswith(TRANSFORMER)}
  for r in rows:
    r["vs_transformer"] = (round(r["decode_tok_s"] / base[r["batch"]], 2)
                           if r["batch"] in base else None)


def markdown(rows: list[dict], contexts: list[dict]) -> str:
  cols = ("model", "params_m", "batch", "state_dtype", "prefill_ms", "decode_ms_step", "decode_tok_s",
          "e2e_tok_s", "vs_transformer", "state_mib", "decode_prog_mib", "peak_mib")
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
  names = [k for k in contexts[0] if k != "context"] if contexts else []
  lines += ["", "Decoding state (MiB) at batch 1 against context length:", "",
            "| context | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
  lines += ["| " + " | ".join(str(c[k]) for k in ("context", *names)) + " |"
            for c in contexts]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="reduced models, prompt 64, gen 16, batches 1 and 4 (CPU smoke)")
  parser.add_argument("--large", action="store_true", help="1.4B / 1.3B models")
  parser.add_argument("--batches", default="1,16,64,128")
  parser.add_argument("--prompt_len", type=int, default=2048)
  parser.add_argument("--gen_len", type=int, default=128)
  parser.add_argument("--prefill_chunk", type=int, default=1024,
                      help="prefill piece length from --chunk_from_batch on (bounds the "
                           "attention logits' memory; fewer pieces compile faster)")
  parser.add_argument("--chunk_from_batch", type=int, default=None,
                      help="default 64; with --large no pieces (see the module docstring)")
  parser.add_argument("--reps", type=int, default=3,
                      help="timed prefill + decode pairs per row (median)")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--state_dtype", default="float32,bfloat16",
                      help="comma list of SSM-state storage dtypes, one row each for the "
                           "models with SSM layers (float32: exact; bfloat16: mamba_ssm's)")
  parser.add_argument("--models", default="", help="comma-separated preset names (override)")
  parser.add_argument("--budget_s", type=float, default=1e9,
                      help="skip the rows that would start after this many seconds")
  parser.add_argument("--out", default="bench_generation.json")
  args = parser.parse_args()
  if args.chunk_from_batch is None:
    args.chunk_from_batch = 2 ** 31 if args.large else 64
  if args.small:
    args.prompt_len, args.gen_len, args.prefill_chunk, args.chunk_from_batch = 64, 16, 32, 4
    if args.batches == parser.get_default("batches"):
      args.batches = "1,4"
  if args.reps < 1:
    raise ValueError(f"--reps must be >= 1, got {args.reps}")
  start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  state_dtypes = parse_state_dtypes(args.state_dtype)
  names = (args.models.split(",") if args.models
           else MODELS["large" if args.large else "base"])
  configs = {n: small_config(n) if args.small else preset(n) for n in names}
  if jax.default_backend() == "gpu":  # cuDNN flash attention for the Transformer's prefill
    configs = {n: cfg.replace(attn_cfg={**cfg.attn_cfg, "implementation": "cudnn"})
               if cfg.attn_layer_idx else cfg for n, cfg in configs.items()}
  batches = [int(b) for b in args.batches.split(",")]
  device = str(jax.devices()[0].device_kind)
  print(f"device: {device}; {dataclasses.asdict(SamplingParams())}; dtype {args.dtype}; "
        f"SSM state dtypes {[d.name for d in state_dtypes]}", flush=True)

  # (model, state dtype or None) pairs: one per state dtype for the models with SSM layers.
  variants = [(n, sd) for n, cfg in configs.items()
              for sd in (state_dtypes if has_ssm(cfg) else [None])]

  def column(name, sd):
    return name if sd is None or len(state_dtypes) == 1 else f"{name} ({sd.name})"

  contexts = [dict(context=c, **{column(n, sd): round(state_nbytes(configs[n], 1, c, dtype, sd)
                                                      / MIB, 2)
                                 for n, sd in variants}) for c in CONTEXTS]
  models = {n: MambaLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
            for n, cfg in configs.items()}
  for c in contexts:
    for n, sd in variants:
      c[f"{column(n, sd)}_measured"] = measured_state_mib(models[n], c["context"], dtype, sd)
  rows: list[dict] = []
  skipped: list[str] = []
  env = environment()

  def save(rows, skipped):
    write_json(args.out, dict(section="generation", device=device, env=env, args=vars(args),
                              dtype=args.dtype, small=args.small, rows=rows, skipped=skipped,
                              state_vs_context=contexts,
                              elapsed_s=time.perf_counter() - start))

  for batch in batches:  # every model at a batch before the next: ratios come early
    for name, sd in variants:
      label = "-" if sd is None else sd.name
      if time.perf_counter() - start > args.budget_s:
        skipped.append(f"{name} batch {batch} state {label}")
        continue
      try:
        row = bench_one(name, models[name], batch, sd, args)
      except Exception as error:  # an OOM at a large batch must not lose the other rows
        row = dict(model=name, batch=batch, state_dtype=label,
                   error=f"{type(error).__name__}: {error}"[:300])
      # The failed row's frames (its caches among their locals) sit in a reference cycle with
      # the traceback until the cycle collector runs; unfreed, they made every later row run
      # out of memory (an H100 run: all rows after the Transformer++'s at batch 128).
      gc.collect()
      rows.append(row)
      print(row, flush=True)
      add_ratios([r for r in rows if "error" not in r])
      save(rows, skipped)
  save(rows, skipped)
  print(markdown([r for r in rows if "error" not in r], contexts))


if __name__ == "__main__":
  main()
