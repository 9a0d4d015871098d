"""Long context: the longest sequence a model can train on, and run a forward over, on one device.

Batch 1, float32 parameters, bfloat16 compute, random tokens. A train step is the loss, its
gradient and an AdamW update (``mamba_jax.training.optimizer.make_optimizer``) with:
  * rematerialization per block (``MambaLM.hidden_states(..., remat=True)``, i.e.
    ``lm.run_block``): the backward keeps only each block's inputs (hidden in the compute
    dtype, the residual stream in float32) and recomputes the rest one block at a time;
    ``--remat_group k`` checkpoints groups of k blocks instead (``lm.run_blocks``), keeping
    n_layer / k + k block inputs;
  * a chunked LM-head loss: the final hidden states are cut into ``--loss_chunk`` tokens, and
    logits + cross-entropy are computed (and recomputed in the backward) one chunk at a time
    in a ``lax.scan``, so the (L, vocab) logits never exist whole.
A forward ("inference") is the backbone over all L tokens and the logits of the last one.
Transformer++ runs cuDNN flash attention on GPUs (XLA's attention materializes L x L).

Search per model and mode: try ``--start``; while it fits, double up to ``--max_length``;
if it does not, halve down to ``--min_length``. Each attempt runs in its own process (an
out-of-memory error ends only that attempt) with a timeout; reported: the longest length that
fit, every attempt (ok, step seconds, peak device GiB, the error), and whether the search
was capped by ``--max_length`` or the time budget.

Usage (GPU): PYTHONPATH=.:.device/training_site python scripts/bench_long_context.py \
    --start 262144 --max_length 1048576 --out /tmp/long.json
CPU smoke: python scripts/bench_long_context.py --smoke --out /tmp/long.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Without preallocation jax's GPU allocator still stops at 75 % of the memory (59.4 GiB of an
# H100 80GB); the models here may use 95 % (75.2 GiB).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from bench_timing import environment, write_json  # noqa: E402


def chunked_loss(model, hidden, targets, chunk: int):
  """Mean next-token cross-entropy of hidden (1, l, d) against targets (1, l), ``chunk``
  tokens of logits at a time (recomputed in the backward;
  ``train_step.chunked_masked_loss_and_accuracy``)."""
  import jax.numpy as jnp
  from mamba_jax.training.train_step import chunked_masked_loss_and_accuracy
  sums = chunked_masked_loss_and_accuracy(model.logits_from_hidden, hidden, targets,
                                          jnp.ones(targets.shape, bool),
                                          model.config.vocab_size, chunk)
  return sums["loss_sum"] / sums["count"]


def model_config(name: str, smoke: bool, on_gpu: bool):
  from mamba_jax.config import preset
  config = preset(name)
  if smoke:
    ssm = dict(config.ssm_cfg)
    if ssm.get("layer") == "Mamba2":
      ssm.update(d_state=16, chunk_size=32, headdim=32)
    attn = dict(config.attn_cfg)
    if attn:
      attn.update(num_heads=2, rotary_emb_dim=32)
    config = config.replace(d_model=64, n_layer=2, vocab_size=256, ssm_cfg=ssm, attn_cfg=attn,
                            attn_layer_idx=(0, 1) if attn else (),
                            d_intermediate=128 if attn else 0)
  if config.attn_layer_idx and on_gpu:
    config = config.replace(attn_cfg={**config.attn_cfg, "implementation": "cudnn"})
  return config


def attempt(name: str, mode: str, length: int, args) -> dict:
  """One train step (mode "train") or forward (mode "forward") at ``length``: timings, memory."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from bench_timing import peak_device_bytes
  from mamba_jax.nn.lm import MambaLM, weight_decay_mask
  from mamba_jax.training.optimizer import default_optimizer_config, make_optimizer

  config = model_config(name, args.smoke, jax.default_backend() == "gpu")
  model = MambaLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = jax.random.randint(jax.random.key(1), (1, length + 1), 0, config.vocab_size)
  inputs, targets = ids[:, :-1], ids[:, 1:]
  chunk = min(args.loss_chunk, length)

  if mode == "train":
    opt = default_optimizer_config()
    tx = make_optimizer(opt, 1000, weight_decay_mask(model))
    opt_state = tx.init(params)

    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      remat = remat_mode(args)
      return chunked_loss(m, m.hidden_states(inputs, remat=remat), targets, chunk)

    @jax.jit
    def step(params, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    run = lambda: step(params, opt_state)
  else:
    @jax.jit
    def forward(params):
      m = nnx.merge(graphdef, params, rest)
      return m.logits_from_hidden(m.hidden_states(inputs)[:, -1])

    run = lambda: forward(params)
  del model
  start = time.perf_counter()
  jax.block_until_ready(run())
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(run())
  step_s = time.perf_counter() - start
  peak = peak_device_bytes()
  return dict(ok=True, first_s=first_s, step_s=step_s,
              peak_gib=None if peak is None else peak / 2 ** 30)


def remat_mode(args) -> bool | int:
  """The ``remat`` argument of ``MambaLM.hidden_states`` that the flags ask for."""
  return args.remat_group if args.remat else False


def search(name: str, mode: str, args, deadline: float) -> dict:
  """Doubling (or halving) search for the longest length that fits; attempts in subprocesses."""
  attempts, length, best, direction = [], args.start, None, 0
  capped = None
  while args.min_length <= length <= args.max_length:
    left = deadline - time.perf_counter()
    if left < 15:
      capped = "time budget"
      break
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
      path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), "--attempt", f"{name}:{mode}:{length}",
           "--out", path, "--loss_chunk", str(args.loss_chunk),
           "--remat_group", str(args.remat_group)] + (
               ["--smoke"] if args.smoke else []) + ([] if args.remat else ["--no_remat"])
    # Each attempt has the device to itself: jax preallocates its share (its own default). In
    # growth mode its allocator refused single buffers that fit (Mamba-2 370M's training step
    # on an H100: 44-61 GiB; it ran once preallocated, at 65.4 GiB peak).
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="true")
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                            timeout=min(left, args.attempt_s))
      if proc.returncode == 0 and os.path.getsize(path) > 0:
        with open(path) as f:
          row = json.load(f)
      else:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        oom = any("RESOURCE_EXHAUSTED" in ln or "out of memory" in ln.lower() for ln in lines)
        row = dict(ok=False, error=("out of memory: " if oom else "") + (lines[-1:] or [""])[0][:300])
    except subprocess.TimeoutExpired:
      row = dict(ok=False, error=f"timeout after {min(left, args.attempt_s):.0f} s")
    os.unlink(path)
    row.update(length=length, wall_s=time.perf_counter() - t0)
    attempts.append(row)
    print(json.dumps(dict(model=name, mode=mode, **row)), flush=True)
    if row["ok"]:
      best = max(best or 0, length)
      if direction < 0:
        break
      direction = 1
      if length * 2 > args.max_length:
        capped = "max_length"
      length *= 2
    else:
      if direction > 0 or row["error"].startswith("timeout"):
        break
      direction = -1
      length //= 2
  return dict(model=name, mode=mode, longest=best, capped_by=capped,
              remat=remat_mode(args),
              loss_chunk=args.loss_chunk, attempts=attempts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mamba2-130m,transformerpp-125m")
  parser.add_argument("--modes", default="train,forward")
  parser.add_argument("--start", type=int, default=262144)
  parser.add_argument("--min_length", type=int, default=8192)
  parser.add_argument("--max_length", type=int, default=4194304)
  parser.add_argument("--loss_chunk", type=int, default=8192)
  parser.add_argument("--no_remat", dest="remat", action="store_false")
  parser.add_argument("--remat_group", type=int, default=1,
                      help="blocks per rematerialized group (lm.run_blocks): 1 = every block, "
                           "k >= 2 = groups of k blocks (n_layer / k + k block inputs kept)")
  parser.add_argument("--budget_s", type=float, default=1e9)
  parser.add_argument("--attempt_s", type=float, default=300)
  parser.add_argument("--smoke", action="store_true", help="tiny models and lengths (CPU)")
  parser.add_argument("--attempt", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="bench_long_context.json")
  args = parser.parse_args()
  if args.attempt:
    name, mode, length = args.attempt.split(":")
    with open(args.out, "w") as f:
      json.dump(attempt(name, mode, int(length), args), f)
    return
  if args.smoke:
    args.start, args.min_length, args.loss_chunk = 128, 64, 64
    if args.max_length == parser.get_default("max_length"):
      args.max_length = 256
  start = time.perf_counter()
  deadline = start + args.budget_s
  result = dict(section="long_context", env=environment(), args=vars(args), rows=[])
  for mode in args.modes.split(","):  # both models' training first: the headline numbers
    for name in args.models.split(","):
      result["rows"].append(search(name, mode, args, deadline))
      result["elapsed_s"] = time.perf_counter() - start
      write_json(args.out, result)


if __name__ == "__main__":
  main()
