"""Training-step throughput, MFU and peak memory (Mamba paper Fig. 8 right and its memory table).

Each case is one model preset (``mamba_jax.config``) at one sequence length, random tokens,
a fixed number of tokens per step (batch = tokens // length), float32 parameters and bfloat16
compute, AdamW (the papers' recipe: β (0.9, 0.95), weight decay 0.1 masked as
``weight_decay_mask``, clipping to norm 1; ``mamba_jax.training.optimizer.make_optimizer``)
and the jitted, donating ``mamba_jax.training.train_step.make_train_step``. Transformer++
runs cuDNN flash attention on GPUs (``attn_cfg["implementation"] = "cudnn"``).

Baseline ``torch``: mamba_ssm 2.3.2.post1's own PyTorch ``MambaLMHeadModel`` (Mamba-2 presets
only: Mamba-1 needs the ``selective_scan_cuda`` extension, which is not built here) from the
unpacked sdist, same config, float32 parameters with bf16 autocast, fused ``torch.optim.AdamW``
(same hyper-parameters, unmasked decay), clipping to norm 1. Without the causal_conv1d
extension its mem-efficient fused path cannot run, so it runs ``use_mem_eff_path=False``:
torch's conv1d, the Triton ``mamba_chunk_scan_combined`` and Triton gated RMSNorm.

Reported per case: compile_s (the first step: trace + compile + run), step_ms (median of
``--steps`` timed steps after ``--warmup``), tokens_per_s, MFU and peak device memory.
MFU = tokens/s · (6 · params + 12 · attention layers · d · L) / 989e12 (dense bf16 H100 SXM;
params counted once with tied embeddings; the attention term is the non-causal count, as
PaLM's appendix B; the SSM's sequence mixing is not counted, as PERF.md does).

Every case runs in its own process (clean peak memory; an OOM ends only that case), with a
timeout from ``--budget_s``; the JSON is rewritten after each case.

Memory (``--memory``, our models only): ``plain`` keeps every activation and the whole
logits; ``chunked_loss`` keeps every block's activations but takes the LM head and loss
``--loss_chunk`` positions at a time (``make_train_step(loss_chunk=...)``: the whole logits and
their gradient never exist at once); ``remat`` also rematerializes each residual block in the
backward (``remat=True``: one more forward of compute, a fraction of the memory);
``partial`` rematerializes ``--remat_fraction`` of the blocks (spread evenly; the rest keep
their activations) with the chunked loss, for a model that does not quite fit; ``auto``
(default) compiles ``plain``, reads XLA's memory analysis of the compiled step (arguments +
outputs + temporaries, less the donated aliases) and runs it, or, if that exceeds
``PLAIN_MEMORY_FRACTION`` of the device's memory limit, does the same with ``chunked_loss``,
then takes ``remat``, in the same process and without running the steps that did not fit
(should a chosen step still run out of memory, the case runs again with ``remat``). Each row
says which it ran (``remat``, ``loss_chunk``, and ``plain_estimate_gib`` /
``chunked_loss_estimate_gib`` where ``auto`` decided; ``compile_s`` includes every
compilation); MFU counts 6 · params either way, not the recomputation.

Usage (GPU):
  PYTHONPATH=.:.device/training_site python scripts/bench_training.py \
      --cases mamba2-130m:2048:jax,mamba2-130m:2048:torch --out /tmp/train.json
CPU numbers for notebook users (tiny models on 2 cores, float32 compute; ``--cpu``):
  JAX_PLATFORMS=cpu taskset -c 0,1 python scripts/bench_training.py --cpu --out /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Without preallocation jax's GPU allocator still stops at 75 % of the memory (59.4 GiB of an
# H100 80GB); the models here may use 95 % (75.2 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from bench_timing import (PEAK_BF16_FLOPS_PER_S, environment, parse_auto_as,  # noqa: E402
                          time_ms, write_json)

TRANSFORMER = "transformerpp"
# The tiny models of the CPU numbers: preset families at d_model 256, 4 layers, byte vocab.
CPU_MODELS = ("mamba-130m", "mamba2-130m", "transformerpp-125m")


def train_flops_per_token(params: int, n_attention_layers: int, d_attention: int,
                          length: int) -> float:
  """6·params + 12·layers·d·L: the training FLOPs per token (forward + backward)."""
  return 6.0 * params + 12.0 * n_attention_layers * d_attention * length


def model_config(name: str, cpu: bool, on_gpu: bool):
  """The preset (or its tiny CPU variant); cuDNN attention for Transformer++ on GPUs."""
  from mamba_jax.config import preset
  config = preset(name)
  if cpu:
    ssm = dict(config.ssm_cfg)
    if ssm.get("layer") == "Mamba2":
      ssm.update(d_state=64, chunk_size=64)
    attn = dict(config.attn_cfg)
    if attn:
      attn.update(num_heads=4, rotary_emb_dim=64)
    config = config.replace(d_model=256, n_layer=4, vocab_size=256, ssm_cfg=ssm,
                            attn_cfg=attn, attn_layer_idx=tuple(range(4)) if attn else (),
                            d_intermediate=768 if attn else 0)
  if name.startswith(TRANSFORMER) and on_gpu:
    config = config.replace(attn_cfg={**config.attn_cfg, "implementation": "cudnn"})
  return config


def attention_width(config) -> tuple[int, int]:
  """(number of attention layers, their width heads·head_dim)."""
  if not config.attn_layer_idx:
    return 0, 0
  heads = config.attn_cfg["num_heads"]
  head_dim = config.attn_cfg.get("head_dim") or config.d_model // heads
  return len(config.attn_layer_idx), heads * head_dim


# ``--memory auto`` runs the plain step only where XLA's estimate is below this fraction of the
# device limit: the estimate leaves out allocator fragmentation and the buffers of custom calls'
# workspaces, and a plain step that still runs out of memory costs a second process. Every H100
# row so far peaked within 0.15 GiB of its estimate; with jax preallocating (each case's
# process), Mamba-2 370M's chunked-loss step (65.4 GiB, 87 % of the 75.2 allowed) ran, so the
# margin is 8 %.
PLAIN_MEMORY_FRACTION = 0.92


def compile_with_bytes(step_fn, *args):
  """(compiled ``step_fn`` for ``args``, the device bytes it needs from XLA's memory analysis:
  arguments + outputs + temporaries, less the outputs aliased to donated arguments)."""
  compiled = step_fn.lower(*args).compile()
  m = compiled.memory_analysis()
  return compiled, int(m.argument_size_in_bytes + m.output_size_in_bytes
                       + m.temp_size_in_bytes - m.alias_size_in_bytes)


def device_limit_bytes() -> int | None:
  """The first JAX device's allocator limit (``bytes_limit``); None on CPU."""
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_limit", 0)) or None


def jax_train_setup(name: str, length: int, tokens: int, cpu: bool, dtype: str
                    ) -> types.SimpleNamespace:
  """One of our models' training setup: ``config``, ``graphdef``, ``rest`` (the non-Param
  state), the optimizer ``tx``, the train ``state``, one batch of random ``data``, ``n_params``
  and ``batch`` (= tokens // length sequences of ``length``)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from mamba_jax.nn.lm import MambaLM, weight_decay_mask
  from mamba_jax.training.optimizer import default_optimizer_config, make_optimizer
  from mamba_jax.training.train_step import init_train_state

  config = model_config(name, cpu, jax.default_backend() == "gpu")
  batch = max(tokens // length, 1)
  model = MambaLM(config, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = sum(int(p.size) for p in jax.tree.leaves(params))
  opt = default_optimizer_config()
  opt.warmup_steps, opt.learning_rate = 10, 1e-4
  tx = make_optimizer(opt, 1000, weight_decay_mask(model))
  state = init_train_state(params, tx)
  del model, params
  ids = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, config.vocab_size)
  data = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": jnp.ones((batch, length), bool)}
  return types.SimpleNamespace(config=config, graphdef=graphdef, rest=rest, tx=tx, state=state,
                               data=data, n_params=n_params, batch=batch)


def jax_case(name: str, length: int, tokens: int, steps: int, warmup: int, cpu: bool,
             dtype: str, memory: str = "plain", loss_chunk: int = 8192,
             remat_fraction: float = 0.25) -> dict:
  import jax
  from bench_timing import peak_device_bytes
  from mamba_jax.training.train_step import make_train_step

  setup = jax_train_setup(name, length, tokens, cpu, dtype)
  config, graphdef, rest, tx = setup.config, setup.graphdef, setup.rest, setup.tx
  state, data, n_params, batch = setup.state, setup.data, setup.n_params, setup.batch
  del setup
  chunk, remat = loss_chunk, {"remat": True, "partial": remat_fraction}.get(memory, False)
  loss_chunk = chunk if memory in ("remat", "chunked_loss", "partial") else 0
  estimates, step_fn, estimate_s = {}, None, 0.0
  limit = device_limit_bytes() if memory == "auto" else None
  if limit is not None:
    start = time.perf_counter()
    for level, level_chunk in (("plain", 0), ("chunked_loss", chunk)):
      compiled, estimates[level] = compile_with_bytes(
          make_train_step(graphdef, rest, tx, config.vocab_size, loss_chunk=level_chunk),
          state, data)
      fits = estimates[level] <= PLAIN_MEMORY_FRACTION * limit
      print(f"{name}:{length}: {level} step needs {estimates[level] / 2 ** 30:.1f} GiB of "
            f"{limit / 2 ** 30:.1f}: {'runs' if fits else 'too much'}", flush=True)
      if fits:
        step_fn, remat, loss_chunk = compiled, False, level_chunk
        break
      del compiled
    else:
      remat, loss_chunk = True, chunk
    estimate_s = time.perf_counter() - start
  if step_fn is None:
    step_fn = make_train_step(graphdef, rest, tx, config.vocab_size, remat=remat,
                              loss_chunk=loss_chunk)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step_fn(holder["state"], data)
    return metrics["loss"]

  start = time.perf_counter()
  loss0 = float(jax.block_until_ready(run()))
  compile_s = estimate_s + time.perf_counter() - start
  step_ms = time_ms(run, jax.block_until_ready, reps=steps, inner=1, warmup=warmup)
  loss = float(run())
  n_att, d_att = attention_width(config)
  return dict(impl="jax", dtype=dtype, params=n_params, batch=batch, compile_s=compile_s,
              step_ms=step_ms,
              flops_per_token=train_flops_per_token(n_params, n_att, d_att, length),
              peak_bytes=peak_device_bytes(), loss_first=loss0, loss_last=loss,
              remat=remat, loss_chunk=loss_chunk,
              **{f"{level}_estimate_gib": v / 2 ** 30 for level, v in estimates.items()},
              attention=config.attn_cfg.get("implementation") if n_att else None)


def load_mamba_ssm_lm(root: str):
  """mamba_ssm's ``MambaLMHeadModel`` and ``MambaConfig`` from an unpacked sdist, without
  its CUDA extensions: a bare package module (its ``__init__`` imports every extension), an
  empty ``selective_scan_cuda`` module when the extension is absent (only Mamba-1 calls it),
  and, when transformers / huggingface_hub lack what it imports, empty stand-ins for the
  helpers that need them (generation, hub loading and upload: unused when training)."""
  pkg = types.ModuleType("mamba_ssm")
  pkg.__path__ = [os.path.join(root, "mamba_ssm")]
  sys.modules["mamba_ssm"] = pkg
  try:
    import selective_scan_cuda  # noqa: F401
  except ImportError:
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
  try:
    from transformers.generation import GenerateDecoderOnlyOutput, TextStreamer  # noqa: F401
    from transformers.utils import CONFIG_NAME, WEIGHTS_NAME  # noqa: F401
    from transformers.utils.hub import cached_file  # noqa: F401
  except ImportError:
    gen = types.ModuleType("mamba_ssm.utils.generation")
    gen.GenerationMixin = type("GenerationMixin", (), {})
    hf = types.ModuleType("mamba_ssm.utils.hf")
    hf.load_config_hf = hf.load_state_dict_hf = None
    sys.modules.update({"mamba_ssm.utils.generation": gen, "mamba_ssm.utils.hf": hf})
  try:
    from huggingface_hub import PyTorchModelHubMixin  # noqa: F401
  except ImportError:  # only a mixin for hub uploads in mamba_ssm's Mamba2
    hub = types.ModuleType("huggingface_hub")
    hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
    sys.modules["huggingface_hub"] = hub
  from mamba_ssm.models.config_mamba import MambaConfig as TorchConfig
  from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
  return MambaLMHeadModel, TorchConfig


def torch_case(name: str, length: int, tokens: int, steps: int, warmup: int,
               root: str) -> dict:
  import torch
  import torch.nn.functional as F
  from mamba_jax.config import preset
  config = preset(name)
  if config.ssm_layer != "Mamba2" or config.attn_layer_idx:
    raise ValueError(f"the torch baseline runs Mamba-2 presets only, got {name!r}")
  model_cls, torch_config = load_mamba_ssm_lm(root)
  fields = config.to_dict()
  fields["ssm_cfg"] = {**fields["ssm_cfg"], "use_mem_eff_path": False}
  torch.manual_seed(0)
  model = model_cls(torch_config(**fields), device="cuda", dtype=torch.float32)
  params = list(model.parameters())
  n_params = sum(p.numel() for p in params)
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
  batch = max(tokens // length, 1)
  ids = torch.randint(0, config.vocab_size, (batch, length + 1), device="cuda")
  vocab = config.vocab_size

  def run():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits[..., :vocab].float().reshape(-1, vocab),
                           ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = lambda _: torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  loss0 = float(run())
  compile_s = time.perf_counter() - start
  step_ms = time_ms(run, sync, reps=steps, inner=1, warmup=warmup)
  return dict(impl="torch", dtype="bfloat16 autocast", params=n_params, batch=batch,
              compile_s=compile_s,
              step_ms=step_ms, flops_per_token=train_flops_per_token(n_params, 0, 0, length),
              peak_bytes=int(torch.cuda.max_memory_allocated()), loss_first=loss0,
              loss_last=float(run()),
              ops_impl=["mamba_ssm use_mem_eff_path=False: torch conv1d, Triton SSD"])


def finish(row: dict, length: int) -> dict:
  """Adds tokens/s and MFU to a case's raw timings."""
  tokens = row["batch"] * length
  row["tokens_per_s"] = tokens / row["step_ms"] * 1e3
  row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / PEAK_BF16_FLOPS_PER_S
  row["peak_gib"] = None if row.get("peak_bytes") is None else row["peak_bytes"] / 2 ** 30
  return row


def add_ratios(rows: list[dict]) -> None:
  """jax_vs_torch: our tokens/s over mamba_ssm's, for the same model and length."""
  for r in rows:
    ref = [s for s in rows if s.get("impl") == "torch" and s["model"] == r["model"]
           and s["length"] == r["length"] and "tokens_per_s" in s]
    if r.get("impl") == "jax" and ref and "tokens_per_s" in r:
      r["jax_vs_torch"] = r["tokens_per_s"] / ref[0]["tokens_per_s"]


def auto_choices(log: str) -> list[str]:
  """The "op: impl='auto' resolved to 'x' on platform" lines of mamba_jax.ops.impl's log."""
  return sorted(set(f"{op}={form} ({where})" for op, form, where in re.findall(
      r"(\w+): impl='auto' resolved to '(\w+)' on ([^\n]+)", log)))


def run_case_in_process(args) -> None:
  from absl import logging
  logging.set_verbosity(logging.INFO)  # mamba_jax logs which form impl='auto' picked
  from mamba_jax.ops.impl import resolve_auto_as
  name, length, impl = args.case.split(":")[:3]
  length = int(length)
  if impl == "torch":
    row = torch_case(name, length, args.tokens, args.steps, args.warmup, args.mamba_ssm_root)
  else:
    choices = parse_auto_as(args.auto_as)
    with resolve_auto_as(**choices):
      row = jax_case(name, length, args.tokens, args.steps, args.warmup, args.cpu, args.dtype,
                     args.memory, args.loss_chunk, args.remat_fraction)
    if choices:
      row["auto_as"] = args.auto_as
  row = finish(dict(model=name, length=length, **row), length)
  with open(args.out, "w") as f:
    json.dump(row, f)


def run_case(args, case: str, tokens: int, memory: str, timeout: float
             ) -> tuple[bool, str, str, str]:
  """Run one case in its own process: (ok, path of its row JSON, output tail, stderr)."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
    path = tmp.name
  cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--out", path,
         "--tokens", str(tokens), "--steps", str(args.steps), "--warmup",
         str(args.warmup), "--mamba_ssm_root", args.mamba_ssm_root, "--dtype", args.dtype,
         "--memory", memory, "--loss_chunk", str(args.loss_chunk),
         "--remat_fraction", str(args.remat_fraction), "--auto_as", args.auto_as] + (
             ["--cpu"] if args.cpu else [])
  # Each case has the GPU to itself: let jax preallocate its share (jax's own default). In
  # growth mode its allocator refused single 44-61 GiB buffers of Mamba-2 370M's step on an
  # H100 80GB that fit, with room to spare, once preallocated (chunked loss: 65.4 GiB peak).
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="true")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    ok = proc.returncode == 0 and os.path.getsize(path) > 0
    return ok, path, (proc.stdout + proc.stderr)[-1500:], proc.stderr
  except subprocess.TimeoutExpired:
    return False, path, f"timeout after {timeout:.0f} s", ""


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="mamba-130m:2048:jax,mamba2-130m:2048:jax,"
                      "mamba2-130m:2048:torch,transformerpp-125m:2048:jax",
                      help="comma-separated model:length:impl[:tokens], impl jax or torch")
  parser.add_argument("--tokens", type=int, default=32768, help="tokens per step")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--budget_s", type=float, default=1e9,
                      help="all cases together; a case gets what is left (at most --case_s)")
  parser.add_argument("--case_s", type=float, default=300)
  parser.add_argument("--cpu", action="store_true",
                      help="tiny models (d 256, 4 layers, vocab 256), length 256, 8 sequences")
  parser.add_argument("--mamba_ssm_root", default=".device/mamba_ssm-2.3.2.post1")
  parser.add_argument("--dtype", default="", choices=("", "bfloat16", "float32"),
                      help="compute dtype of our models (default bfloat16; float32 with --cpu, "
                           "where XLA's bf16 arithmetic is emulated and slow)")
  parser.add_argument("--memory", default="auto",
                      choices=("auto", "plain", "chunked_loss", "remat", "partial"),
                      help="activation memory of our models (see the module docstring)")
  parser.add_argument("--loss_chunk", type=int, default=8192,
                      help="positions of logits at a time with --memory chunked_loss / remat")
  parser.add_argument("--remat_fraction", type=float, default=0.25,
                      help="blocks rematerialized with --memory partial (0 < f < 1)")
  parser.add_argument("--auto_as", default="",
                      help="op=impl,... : what impl='auto' of each named op resolves to in our "
                           "models (mamba_jax.ops.impl.resolve_auto_as), e.g. "
                           "ssd_gpu_bwd=shared_w,softmax_cross_entropy_with_accuracy=pallas")
  parser.add_argument("--case", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="bench_training.json")
  args = parser.parse_args()
  args.dtype = args.dtype or ("float32" if args.cpu else "bfloat16")
  if args.case:
    run_case_in_process(args)
    return
  if args.cpu and args.cases == parser.get_default("cases"):
    args.cases = ",".join(f"{m}:256:jax" for m in CPU_MODELS)
    args.tokens = 2048

  start = time.perf_counter()
  result = dict(section="cpu" if args.cpu else "training", env=environment(), args=vars(args),
                peak_flops=PEAK_BF16_FLOPS_PER_S, rows=[], skipped=[], errors=[])
  for case in args.cases.split(","):
    left = args.budget_s - (time.perf_counter() - start)
    name, length, impl, *rest = case.split(":")
    tokens = int(rest[0]) if rest else args.tokens
    if left < 20:
      result["skipped"].append(case)
      continue
    t0 = time.perf_counter()
    memories = ["auto", "remat"] if args.memory == "auto" and impl == "jax" else [args.memory]
    for attempt, memory in enumerate(memories):
      ok, path, tail, stderr = run_case(args, case, tokens, memory,
                                        min(args.budget_s - (time.perf_counter() - start),
                                            args.case_s))
      out_of_memory = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
      if (ok or not out_of_memory or attempt == len(memories) - 1
          or args.budget_s - (time.perf_counter() - start) < 20):
        break  # the last attempt's file is read (or its error kept) and removed below
      print(f"{case}: out of memory with --memory {memory}; again with remat", flush=True)
      os.unlink(path)
    if ok:
      with open(path) as f:
        row = json.load(f)
      row.setdefault("ops_impl", auto_choices(stderr))
      result["rows"].append(row)
      print(json.dumps(row), flush=True)
    else:
      last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
      error = dict(case=case, model=name, length=int(length), impl=impl, error=last[0][:400],
                   wall_s=time.perf_counter() - t0)
      result["errors"].append(error)
      print(f"{case}: FAILED\n{tail}", flush=True)
    os.unlink(path)
    add_ratios(result["rows"])
    result["elapsed_s"] = time.perf_counter() - start
    write_json(args.out, result)
  add_ratios(result["rows"])
  write_json(args.out, result)


if __name__ == "__main__":
  main()
