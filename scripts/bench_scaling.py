"""Training-step throughput and longest trainable sequence under (data, tensor, sequence) meshes.

A Mamba-2 and a Transformer++ of about the same size (``--size``: ``370m`` =
mamba2-370m / transformerpp-350m, ``1.4b`` = mamba2-1.3b / transformerpp-1.3b; ``auto``
picks 370m on one or two devices and 1.4b on more) train with bf16 compute, float32
parameters and AdamW (β = (0.9, 0.95), weight decay 0.1, global-norm clip 1.0), at each
sequence length of ``--seqs`` (8K, 32K, 128K) under each mesh "DxTxS" (data × tensor ×
sequence; fsdp = 1) of ``--meshes``, plus the one-device baseline 1x1x1. One sequence per
data-parallel replica: the global batch is D sequences, so data parallelism is weak
scaling and tensor / sequence parallelism strong scaling of one sequence.

Reported per (model, mesh, length): tokens/s (median step), tokens/s per device, scaling
efficiency = tokens/s / (devices × the 1x1x1 tokens/s at that length), compile time, peak
memory per device (``memory_stats()["peak_bytes_in_use"]``, the largest over the mesh),
and per (model, mesh) the longest sequence that trains: after the timed lengths, a capped
doubling search (one step per length, from twice the longest timed length or
``--search_from``, up to ``--max_seq``), stopped by the first out-of-memory.

How the step is built (the same for every mesh): the layers' parameters are stacked and
the blocks run under ``lax.scan`` with ``jax.checkpoint`` per block (one block compiled,
only the residual stream kept per layer; recomputed in the backward), the Mamba-2 mixers
through ``mamba_jax.sharding.parallelize``'s ``ParallelMixer`` (tensor / sequence parallel
SSD, conv and projections; a trivial mesh runs the same code), the Transformer++ through
XLA's partitioning of the model's own attention (cuDNN flash attention on GPUs,
``--attention``); the cross-entropy is taken over ``--loss_chunk``-token slices of the
length (the float32 logits of 128K tokens × 50K vocabulary would not fit). Mamba-2 uses
ngroups = 8 (the released checkpoints have 1; tensor parallelism needs ngroups % tensor
= 0, Mamba-2 §8). Sequence parallelism does not cover attention: Transformer++ skips
meshes with S > 1.

Isolation and time: every (model, mesh) runs in its own subprocess (lengths ascending,
so the process-lifetime peak memory after a length is that length's peak; an OOM ends
that mesh's search and nothing else). ``--budget_s`` bounds the whole run: each mesh gets
a fair share of what is left, a length is not started when its estimated time (compile
and steps, scaled from the previous length) does not fit, and a subprocess still running
at the end of the budget is killed (its finished lengths are kept).

NCCL's NVLink multicast stays off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``
and ``NVSHMEM_DISABLE_NVLS=1`` are set in ``os.environ`` before jax is imported (and
inherited by the subprocesses).

Usage (repository root):
  PYTHONPATH=. python scripts/bench_scaling.py --budget_s 240 --out_dir $OUT --tag 4gpu
  CPU smoke test (8 host devices, tiny models, seconds per mesh):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
      python scripts/bench_scaling.py --smoke --out_dir /tmp/scaling
Writes ``<tag>.json`` (device, versions, date, every row), ``<tag>.png`` and appends the
markdown table to ``--markdown`` (default ``<out_dir>/<tag>.md``).

Letter legend: b batch, l length, d d_model, v vocabulary, n layers, D/T/S mesh sizes.
"""

from __future__ import annotations

import os

# NVLink multicast off, before jax (and NCCL) are loaded; inherited by the workers.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

MODELS = ("mamba2", "transformerpp")
PRESETS = {("mamba2", "370m"): "mamba2-370m", ("transformerpp", "370m"): "transformerpp-350m",
           ("mamba2", "1.4b"): "mamba2-1.3b", ("transformerpp", "1.4b"): "transformerpp-1.3b"}
DEFAULT_MESHES = {
    1: ["1x1x1"],
    2: ["1x1x1", "2x1x1", "1x2x1", "1x1x2"],
    4: ["1x1x1", "4x1x1", "1x4x1", "1x1x4", "2x2x1", "1x2x2"],
    8: ["1x1x1", "8x1x1", "1x8x1", "1x1x8", "2x2x2", "1x4x2", "1x2x4", "4x2x1"],
}
SMOKE_MESHES = ["1x1x1", "4x1x1", "1x2x2", "2x2x1", "1x1x4"]
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")
MIN_START_S = 20.0   # do not start a mesh with less than this left


def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"mesh {text!r} must be DxTxS with positive sizes, e.g. 2x2x1")
  return tuple(int(p) for p in parts)


def mesh_devices(text: str) -> int:
  return math.prod(parse_mesh(text))


# ----------------------------------------------------------------------------------------
# The worker: one (model, mesh) in this process.

def bench_config(model: str, size: str, smoke: bool, attention: Optional[str]):
  """The MambaConfig of ``model`` at ``size`` (tiny ones with ``smoke``)."""
  from mamba_jax.config import MambaConfig, preset
  if smoke:
    config = MambaConfig.tiny(layer="Mamba2" if model == "mamba2" else "attention")
    if model == "mamba2":  # 4 layers; 4 heads of 16, 4 groups, chunk 8
      return config.replace(n_layer=4, ssm_cfg={**config.ssm_cfg, "ngroups": 4})
    return config.replace(n_layer=4, attn_layer_idx=(0, 1, 2, 3),
                          attn_cfg={**config.attn_cfg, "causal": True})
  config = preset(PRESETS[(model, size)])
  if model == "mamba2":
    return config.replace(ssm_cfg={**config.ssm_cfg, "ngroups": 8})
  if attention:
    return config.replace(attn_cfg={**config.attn_cfg, "implementation": attention})
  return config


def chunked_cross_entropy(x, w, targets, vocab_size: int, chunk: int):
  """Mean next-token cross-entropy of logits x·wᵀ over ``chunk``-token slices.

  x (b, l, d) in the compute dtype, w (v_pad, d), targets (b, l) int -> float32 scalar
  (float64 for float64 x).
  The length is viewed as (l / n, n) with n = l / chunk slices of *strided* positions
  (j·n + i), scanned over i with the logits recomputed in the backward: each step's
  (b, chunk, v_pad) float32 logits are the only ones alive, and a length split in
  contiguous blocks over ``sequence`` stays split (the l / n axis keeps the blocks).
  Padded vocabulary entries are masked out of the softmax.
  """
  import jax
  import jax.numpy as jnp
  import optax
  b, l, d = x.shape
  n = max(1, l // chunk)
  if l % n:
    raise ValueError(f"length {l} is not divisible by the {n} loss slices of --loss_chunk "
                     f"{chunk}; pick a chunk that divides the length")
  xs = jnp.moveaxis(x.reshape(b, l // n, n, d), 2, 0)        # (n, b, l/n, d)
  ts = jnp.moveaxis(targets.reshape(b, l // n, n), 2, 0)      # (n, b, l/n)
  real = jnp.arange(w.shape[0]) < vocab_size
  acc = jnp.promote_types(x.dtype, jnp.float32)  # float32 logits (float64 for float64 x)

  @jax.checkpoint
  def body(total, xt):
    xc, tc = xt
    logits = jnp.einsum("bld,vd->blv", xc, w, preferred_element_type=acc)
    logits = jnp.where(real, logits, -1e9)
    return total + optax.softmax_cross_entropy_with_integer_labels(logits, tc).sum(), None

  total, _ = jax.lax.scan(body, jnp.zeros((), acc), (xs, ts))
  return total / (b * l)


class ScannedLM:
  """A MambaLM's training forward with its layers stacked and scanned (see the docstring).

  ``params`` = {"embedding": State, "layers": State with a leading (n,) axis, "norm_f":
  State}; :meth:`loss` equals the model's forward and cross-entropy (tests/scripts check
  it against ``MambaLM.__call__``).
  """

  def __init__(self, config, dtype, mesh=None, remat: bool = True, loss_chunk: int = 8192,
               ssd_impl: str = "auto"):
    from flax import nnx
    from mamba_jax.nn.lm import MambaLM
    self.config, self.dtype, self.mesh = config, dtype, mesh
    self.remat, self.loss_chunk, self.ssd_impl = remat, loss_chunk, ssd_impl
    abstract = nnx.eval_shape(lambda: MambaLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    self.embedding_def = nnx.split(abstract.backbone.embedding)[0]
    self.block_def = nnx.split(abstract.backbone.layers[0])[0]
    self.norm_def = nnx.split(abstract.backbone.norm_f)[0]
    self.ssm = config.layer_kinds[0] != "attention"
    if len(set(config.layer_kinds)) != 1:
      raise ValueError(f"ScannedLM needs layers of one kind, got {set(config.layer_kinds)}")
    if not config.tie_embeddings:
      raise ValueError("ScannedLM computes the logits with the tied embedding")

  def init(self, seed: int = 0, tile_layers: bool = False):
    """The stacked parameters (call inside jax.jit to materialise them sharded).

    ``tile_layers``: build one block and repeat its parameters n_layer times (the residual
    rescaling still uses the full n_layer). Identical layers cost the same to train as
    distinct ones, and tracing one block instead of n_layer keeps the jitted init fast (the
    full 48-layer init took ~45 s to compile on an H200, longer than a mesh's time share).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from mamba_jax.nn.lm import MambaLM
    if not tile_layers:
      model = MambaLM(self.config, dtype=self.dtype, rngs=nnx.Rngs(seed))
      return self.stack(nnx.state(model, nnx.Param))
    one = self.config.replace(n_layer=1, attn_layer_idx=(0,) if self.config.attn_layer_idx
                              else ())
    state = nnx.state(MambaLM(one, dtype=self.dtype, rngs=nnx.Rngs(seed)), nnx.Param)
    layer = state["backbone"]["layers"][0]
    scale = self.config.n_layer ** -0.5  # out_proj / fc2 were rescaled for n_layer = 1
    residual = lambda path: any(k in jax.tree_util.keystr(path) for k in ("out_proj", "fc2"))
    layer = jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if residual(path) else x, layer)
    n = self.config.n_layer
    return {"embedding": state["backbone"]["embedding"],
            "layers": jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), layer),
            "norm_f": state["backbone"]["norm_f"]}

  def stack(self, state):
    """A MambaLM's ``nnx.state(model, nnx.Param)`` -> the stacked layout."""
    import jax
    import jax.numpy as jnp
    layers = [state["backbone"]["layers"][i] for i in range(self.config.n_layer)]
    return {"embedding": state["backbone"]["embedding"],
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers),
            "norm_f": state["backbone"]["norm_f"]}

  def decay_mask(self):
    """AdamW's weight-decay mask in the stacked layout (``nn.lm.weight_decay_mask``)."""
    from flax import nnx
    from mamba_jax.nn.lm import MambaLM, weight_decay_mask
    abstract = nnx.eval_shape(lambda: MambaLM(self.config, dtype=self.dtype,
                                              rngs=nnx.Rngs(0)))
    mask = weight_decay_mask(abstract)
    return {"embedding": mask["backbone"]["embedding"],
            "layers": mask["backbone"]["layers"][0], "norm_f": mask["backbone"]["norm_f"]}

  def shardings(self, tree, mesh):
    """NamedShardings of a tree holding stacked params (and optimizer moments that
    mirror them): the logical table's specs of layer 0, with the stacked axis unsplit."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from mamba_jax.sharding.shard import partition_specs
    params = tree["params"] if "params" in tree else tree
    layer0 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                          params["layers"])
    specs = partition_specs({"backbone": {"embedding": params["embedding"],
                                          "layers": {0: layer0}, "norm_f": params["norm_f"]}},
                            self.config, mesh)
    stacked = {"embedding": specs["backbone"]["embedding"],
               "layers": jax.tree.map(lambda s: PartitionSpec(None, *s),
                                      specs["backbone"]["layers"][0],
                                      is_leaf=lambda x: isinstance(x, PartitionSpec)),
               "norm_f": specs["backbone"]["norm_f"]}
    structure = jax.tree.structure(params)
    is_params = lambda x: (not isinstance(x, PartitionSpec)
                           and jax.tree.structure(x) == structure)
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), stacked,
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree.map(lambda x: named if is_params(x) else NamedSharding(mesh,
                                                                           PartitionSpec()),
                        tree, is_leaf=is_params)

  def loss(self, params, inputs, targets):
    """Mean next-token cross-entropy: inputs, targets (b, l) int -> float32 scalar."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from mamba_jax.sharding import logical as lg
    from mamba_jax.sharding.parallel_mixers import ParallelMixer
    from mamba_jax.sharding.rules import rules_for_mesh
    mesh = self.mesh
    rules = rules_for_mesh(mesh) if mesh is not None else None
    act = (lg.ACT_BATCH, lg.ACT_LENGTH, lg.ACT_EMBED)

    def constrain(x):
      if mesh is None:
        return x
      with lg.use_rules(mesh, rules):
        return lg.constrain(x, act)

    hidden = constrain(nnx.merge(self.embedding_def, params["embedding"])(inputs))
    residual = jnp.zeros(hidden.shape, jnp.promote_types(hidden.dtype, jnp.float32))

    def block(carry, layer):
      hidden, residual = carry
      module = nnx.merge(self.block_def, layer)
      if mesh is not None and self.ssm:
        module.mixer = ParallelMixer(module.mixer, mesh, rules, ssd_impl=self.ssd_impl)
      hidden, residual = module(hidden, residual)
      return (constrain(hidden), constrain(residual)), None

    if self.remat:
      block = jax.checkpoint(block, prevent_cse=False)
    (hidden, residual), _ = jax.lax.scan(block, (hidden, residual), params["layers"])
    x = nnx.merge(self.norm_def, params["norm_f"])(hidden.astype(residual.dtype) + residual)
    w = params["embedding"]["embedding"][...].astype(self.dtype)
    return chunked_cross_entropy(x.astype(self.dtype), w, targets, self.config.vocab_size,
                                 self.loss_chunk)


def _optimizer(mask):
  import optax
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask))


def _is_oom(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}"
  return any(marker in text for marker in OOM_MARKERS)


def _emit(**record) -> None:
  print("RESULT " + json.dumps(record), flush=True)


def worker(spec: dict) -> None:
  """Runs one (model, mesh): lengths ascending, then the doubling search; prints RESULT
  lines (parsed by the parent)."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from mamba_jax.sharding.mesh import MeshConfig, make_mesh, validate_mesh
  from mamba_jax.sharding.shard import batch_sharding

  d, t, s = parse_mesh(spec["mesh"])
  devices = jax.devices()[:d * t * s]
  if len(devices) < d * t * s:
    raise ValueError(f"mesh {spec['mesh']} needs {d * t * s} devices, {len(devices)} visible")
  mesh = make_mesh(MeshConfig(data=d, fsdp=1, tensor=t, sequence=s), devices)
  dtype = jnp.bfloat16 if not spec["smoke"] else jnp.float32
  config = bench_config(spec["model"], spec["size"], spec["smoke"], spec["attention"])
  lm = ScannedLM(config, dtype, mesh, remat=True, loss_chunk=spec["loss_chunk"],
                 ssd_impl=spec.get("ssd_impl", "auto"))
  deadline = spec["deadline"]
  base = dict(model=spec["model"], preset=(PRESETS.get((spec["model"], spec["size"]))
                                           if not spec["smoke"] else "tiny"),
              mesh=spec["mesh"], devices=d * t * s, batch=d)

  t0 = time.time()
  tx = _optimizer(lm.decay_mask())

  def init():
    params = lm.init(tile_layers=True)
    return {"params": params, "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init)
  shardings = lm.shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  _emit(**base, event="init", params=n_params, seconds=round(time.time() - t0, 1))

  data = batch_sharding(mesh)

  def train_step(state, inputs, targets):
    loss, grads = jax.value_and_grad(lm.loss)(state["params"], inputs, targets)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  step = jax.jit(train_step, in_shardings=(shardings, data, data),
                 out_shardings=(shardings, None), donate_argnums=0)

  def compile_for(length: int):
    """The step compiled ahead of time for ``length`` (abstract arguments only)."""
    ids = jax.ShapeDtypeStruct((d, length), jnp.int32, sharding=data)
    c0 = time.time()
    compiled = step.lower(abstract_state, ids, ids).compile()
    return compiled, round(time.time() - c0, 2)

  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  # The timed lengths compile concurrently (XLA compiles outside the GIL; a GPU host has
  # cores to spare), so a mesh costs about one compile instead of one per length.
  invalid: dict[int, str] = {}  # length -> why the mesh cannot take it
  for length in spec["seqs"] + spec["search"]:
    try:
      validate_mesh(mesh, config, batch=d, length=length)
    except ValueError as e:
      invalid[length] = str(e)
  valid = [n for n in spec["seqs"] if n not in invalid]
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(valid)))
  futures = {length: pool.submit(compile_for, length) for length in valid}
  c_all = time.time()
  previous: Optional[dict] = None
  for length, timed in [(n, True) for n in spec["seqs"]] + [(n, False) for n in spec["search"]]:
    if previous is not None and length not in futures:
      scale = length / previous["seq"]
      estimate = previous["compile_s"] + (spec["steps"] + 1) * previous["step_s"] * scale
      if time.time() + estimate > deadline:
        _emit(**base, event="skipped", seq=length, reason="time budget",
              estimate_s=round(estimate, 1))
        return
    # The first length always runs: the parent kills this process when the whole budget ends,
    # and a mesh with no measurement at all (its start-up ate its share) says nothing.
    if length in invalid:
      _emit(**base, event="invalid", seq=length, error=invalid[length])
      continue
    record = dict(base, seq=length, tokens=d * length, timed=timed)
    try:
      key = jax.random.key(length)
      ids = jax.jit(lambda k: jax.random.randint(k, (d, length + 1), 0, config.vocab_size),
                    out_shardings=None)(key)
      inputs = jax.device_put(ids[:, :-1], data)
      targets = jax.device_put(ids[:, 1:], data)
      if length in futures:
        compiled, record["compile_s"] = futures.pop(length).result()
        record["compile_wall_s"] = round(time.time() - c_all, 2)  # all concurrent ones so far
      else:
        compiled, record["compile_s"] = compile_for(length)
      times = []
      for i in range(1 + (spec["steps"] if timed else 0)):
        s0 = time.time()
        state, loss = compiled(state, inputs, targets)
        loss = float(loss)
        times.append(time.time() - s0)
      step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
      record.update(event="ok", loss=loss, step_s=round(step_s, 4),
                    first_step_s=round(times[0], 3),
                    tokens_per_s=round(d * length / step_s, 1) if timed else None)
      stats = [dev.memory_stats() or {} for dev in devices]
      peaks = [st.get("peak_bytes_in_use") for st in stats]
      record["peak_gib_per_device"] = ([round(p / 2**30, 2) for p in peaks]
                                       if all(p is not None for p in peaks) else None)
      limits = [st.get("bytes_limit") for st in stats]
      record["limit_gib"] = (round(min(limits) / 2**30, 2)
                             if all(x is not None for x in limits) else None)
      _emit(**record)
      previous = dict(seq=length, compile_s=record["compile_s"], step_s=step_s)
      if not math.isfinite(loss):
        _emit(**base, event="error", seq=length, error=f"loss is {loss}")
        return
    except Exception as e:  # OOM ends this mesh's search; other errors are reported too
      oom = _is_oom(e)
      _emit(**record, event="oom" if oom else "error",
            error=f"{type(e).__name__}: {str(e)[:600]}")
      return


# ----------------------------------------------------------------------------------------
# The parent: probe, schedule, collect, report.

def probe(env: dict) -> dict:
  code = ("import json, jax, flax, optax, numpy, platform; d = jax.devices(); "
          "print(json.dumps(dict(count=len(d), kind=d[0].device_kind, platform=d[0].platform, "
          "versions=dict(python=platform.python_version(), jax=jax.__version__, "
          "flax=flax.__version__, optax=optax.__version__, numpy=numpy.__version__))))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  if out.returncode:
    raise RuntimeError(f"device probe failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


_RUNNING: list[subprocess.Popen] = []


def _stop_workers(signum, frame) -> None:
  """SIGTERM / SIGINT of the parent (e.g. ``timeout``): its worker must not outlive it (it
  would hold the GPUs)."""
  for proc in _RUNNING:
    proc.kill()
  sys.exit(128 + signum)


def run_job(spec: dict, env: dict, hard_end: float, log) -> list[dict]:
  """One worker subprocess; its RESULT records (killed at ``hard_end``)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1)
  _RUNNING.append(proc)
  records: list[dict] = []
  tail: list[str] = []
  import selectors
  selector = selectors.DefaultSelector()
  selector.register(proc.stdout, selectors.EVENT_READ)
  killed = False
  while True:
    remaining = hard_end - time.time()
    if remaining <= 0:
      proc.kill()
      killed = True
      break
    if not selector.select(timeout=min(remaining, 5.0)):
      if proc.poll() is not None:
        break
      continue
    line = proc.stdout.readline()
    if not line:
      break
    if line.startswith("RESULT "):
      record = json.loads(line[len("RESULT "):])
      records.append(record)
      log(f"  {_describe(record)}")
    else:
      tail = (tail + [line.rstrip()])[-40:]
  proc.wait()
  _RUNNING.remove(proc)
  if killed:
    records.append(dict(model=spec["model"], mesh=spec["mesh"], event="killed",
                        reason="budget_s reached while running"))
    log(f"  killed at the end of the budget")
  elif proc.returncode and not any(r["event"] in ("oom", "error") for r in records):
    message = "\n".join(tail[-15:])
    oom = any(marker in message for marker in OOM_MARKERS)
    records.append(dict(model=spec["model"], mesh=spec["mesh"], event="oom" if oom else "crash",
                        returncode=proc.returncode, error=message[-1500:]))
    log(f"  worker exited {proc.returncode}:\n{message}")
  return records


def _describe(r: dict) -> str:
  if r["event"] == "init":
    return f"init: {r['params'] / 1e6:.1f}M parameters ({r['seconds']} s)"
  if r["event"] == "ok":
    peak = max(r["peak_gib_per_device"]) if r.get("peak_gib_per_device") else None
    rate = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else "trains"
    return (f"l={r['seq']}: {rate}, step {r['step_s']:.3f} s, compile {r['compile_s']} s, "
            f"peak {peak} GiB")
  return f"l={r.get('seq')}: {r['event']} {r.get('reason') or r.get('error', '')[:200]}"


FAILURES = ("oom", "error", "crash", "killed", "skipped", "invalid")


def summarize(records: list[dict], meshes: list[str], models: list[str],
              cap: Optional[int] = None) -> dict:
  """Rows (one per model, mesh, timed length) with efficiencies; longest per model, mesh
  and what stopped it: the last failure above it (oom, error, time budget, ...), "cap"
  when the search reached ``cap``, else "not searched"."""
  ok = [r for r in records if r["event"] == "ok"]
  base = {(r["model"], r["seq"]): r["tokens_per_s"] for r in ok
          if r["mesh"] == "1x1x1" and r.get("tokens_per_s")}
  rows = []
  for r in ok:
    if not r.get("tokens_per_s"):
      continue
    one = base.get((r["model"], r["seq"]))
    rows.append(dict(model=r["model"], preset=r["preset"], mesh=r["mesh"], seq=r["seq"],
                     devices=r["devices"], batch=r["batch"], tokens_per_s=r["tokens_per_s"],
                     tokens_per_s_per_device=round(r["tokens_per_s"] / r["devices"], 1),
                     efficiency=(round(r["tokens_per_s"] / (r["devices"] * one), 3)
                                 if one else None),
                     step_s=r["step_s"], compile_s=r["compile_s"],
                     peak_gib=(max(r["peak_gib_per_device"])
                               if r.get("peak_gib_per_device") else None)))
  longest = []
  for model in models:
    for mesh in meshes:
      mine = [r for r in records if r.get("model") == model and r.get("mesh") == mesh]
      if not mine:
        continue
      if mine[0]["event"] == "not_applicable":
        longest.append(dict(model=model, mesh=mesh, longest=None, stopped_by=(
            f"n/a: {mine[0]['reason']}"), stopped_at=None, peak_gib=None))
        continue
      trained = [r["seq"] for r in mine if r["event"] == "ok"]
      best = max(trained) if trained else 0
      above = [r for r in mine if r["event"] in FAILURES and (r.get("seq") or math.inf) > best]
      stop = above[-1] if above else None  # the later pass's (the search's) failure
      reason = (stop["event"] + (f" ({stop['reason']})" if stop.get("reason") else "")
                if stop else "cap" if cap and best >= cap else "not searched")
      longest.append(dict(
          model=model, mesh=mesh, longest=best or None, stopped_by=reason,
          stopped_at=stop.get("seq") if stop else None,
          peak_gib=next((max(r["peak_gib_per_device"]) for r in reversed(mine)
                         if r["event"] == "ok" and r.get("peak_gib_per_device")), None)))
  return dict(rows=rows, longest=longest)


def markdown(summary: dict, header: str) -> str:
  lines = [f"### {header}", "",
           "| model | mesh D×T×S | length | tokens/s | tokens/s/device | efficiency vs 1 device "
           "| step s | peak GiB/device | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(summary["rows"], key=lambda r: (r["model"], r["seq"], r["devices"],
                                                   r["mesh"])):
    eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "n/a"
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
    lines.append(f"| {r['model']} | {r['mesh']} | {r['seq']} | {r['tokens_per_s']:.0f} | "
                 f"{r['tokens_per_s_per_device']:.0f} | {eff} | {r['step_s']:.3f} | {peak} | "
                 f"{r['compile_s']:.0f} |")
  lines += ["", "| model | mesh D×T×S | longest length that trains | stopped by | "
            "peak GiB/device there |", "|---|---|---|---|---|"]
  for r in summary["longest"]:
    stop = r["stopped_by"] + (f" at {r['stopped_at']}" if r["stopped_at"] else "")
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
    lines.append(f"| {r['model']} | {r['mesh']} | {r['longest'] or 'none'} | {stop} | {peak} |")
  return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> Optional[str]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    return f"no PNG: matplotlib does not import ({e})"
  models = sorted({r["model"] for r in summary["rows"]} | {r["model"] for r in
                                                            summary["longest"]})
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  ax = axes[0]
  keys = sorted({(r["model"], r["mesh"]) for r in summary["rows"]},
                key=lambda k: (k[0], mesh_devices(k[1]), k[1]))
  seqs = sorted({r["seq"] for r in summary["rows"]})
  width = 0.8 / max(1, len(seqs))
  for j, seq in enumerate(seqs):
    values = [next((r["tokens_per_s_per_device"] for r in summary["rows"]
                    if (r["model"], r["mesh"]) == k and r["seq"] == seq), 0) for k in keys]
    ax.bar([i + j * width for i in range(len(keys))], values, width, label=f"l={seq}")
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
  ax.set_xticklabels([f"{m}\n{mesh}" for m, mesh in keys], rotation=60, fontsize=7)
  ax.set_ylabel("tokens/s per device")
  ax.set_title("training throughput per device")
  ax.legend(fontsize=7)
  ax = axes[1]
  rows = [r for r in summary["longest"] if r["longest"]]
  ax.bar(range(len(rows)), [math.log2(r["longest"]) for r in rows],
         color=["C0" if r["model"] == models[0] else "C1" for r in rows])
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([f"{r['model']}\n{r['mesh']}" for r in rows], rotation=60, fontsize=7)
  ax.set_ylabel("log2(longest sequence that trains)")
  ax.set_title("longest sequence (capped doubling search)")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return None


def merge(paths: list[str], out_dir: str, tag: str, markdown_path: str = "") -> int:
  """One report from the JSONs of runs of this script on disjoint devices of one host."""
  runs = []
  for path in paths:
    with open(path) as f:
      runs.append(json.load(f))
  kinds = {r["device"]["kind"] for r in runs}
  sizes = {r["size"] for r in runs}
  if len(kinds) != 1 or len(sizes) != 1:
    raise ValueError(f"--merge needs runs of one device kind and one --size, got kinds "
                     f"{sorted(kinds)} and sizes {sorted(sizes)}")
  records = [rec for r in runs for rec in r["records"]]
  meshes = list(dict.fromkeys(m for r in runs for m in r["meshes"]))
  models = list(dict.fromkeys(rec["model"] for rec in records if rec.get("model")))
  cap = max(max(r["search"], default=0) for r in runs) or None
  summary = summarize(records, meshes, models, cap)
  count = max(r["device"]["count"] for r in runs)
  header = (f"{count} x {runs[0]['device']['kind']} ({runs[0]['device']['platform']}), size "
            f"{runs[0]['size']}, {min(r['date'] for r in runs)[:16].replace('T', ' ')} UTC, jax "
            f"{runs[0]['device']['versions']['jax']} (merged from {len(runs)} concurrent runs "
            "on disjoint GPUs)")
  table = markdown(summary, header)
  print(table)
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, f"{tag}.png")
  if plot(summary, png, header):
    png = None
  with open(markdown_path or os.path.join(out_dir, f"{tag}.md"), "a") as f:
    f.write(table + "\n\n")
  result = dict(script="scripts/bench_scaling.py", merged_from=[os.path.basename(p) for p in
                                                               paths],
                date=min(r["date"] for r in runs), device=dict(runs[0]["device"], count=count),
                size=runs[0]["size"], meshes=meshes, runs=[{k: r.get(k) for k in (
                    "date", "device", "meshes", "seqs", "search", "steps", "budget_s", "env",
                    "seconds")} for r in runs], records=records, **summary, table=table,
                png=png)
  with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
    json.dump(result, f, indent=1)
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny models, short lengths (CPU with fake devices)")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--size", default="auto", choices=("auto", "370m", "1.4b"))
  parser.add_argument("--seqs", default="8192,32768,131072", help="timed lengths")
  parser.add_argument("--meshes", default="", help="DxTxS list (default: by device count)")
  parser.add_argument("--max_seq", type=int, default=1 << 20,
                      help="cap of the longest-length doubling search (0: no search)")
  parser.add_argument("--search_meshes", default="",
                      help="meshes of the longest-length search (default: all)")
  parser.add_argument("--search_from", type=int, default=0,
                      help="first length of the search (default: twice the longest timed "
                           "length that trained), to spend a short budget near the limit")
  parser.add_argument("--search_share", type=float, default=0.35,
                      help="fraction of --budget_s kept for the longest-length search")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up")
  parser.add_argument("--loss_chunk", type=int, default=8192)
  parser.add_argument("--attention", default="auto",
                      help="Transformer++ attention implementation: auto (cudnn on GPUs), "
                           "cudnn, xla")
  parser.add_argument("--ssd_impl", default="auto", choices=("chunked", "auto", "pallas"),
                      help="the Mamba-2 mixers' per-device SSD (mamba_jax.ops.ssd impl; auto: "
                           "the fused kernels on Hopper GPUs, as ParallelMixer's default)")
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="wall-time budget of the whole run (no new length started "
                           "past it; running workers killed at it)")
  parser.add_argument("--out_dir", default=os.environ.get("OUT", "."))
  parser.add_argument("--tag", default="bench_scaling")
  parser.add_argument("--markdown", default="", help="markdown file to append the table to")
  parser.add_argument("--merge", default="",
                      help="comma-separated JSONs of runs made at the same time on disjoint "
                           "GPUs of one host (e.g. the 1x1x1 baseline on one GPU beside the "
                           "meshes on the others): one table, efficiencies against the "
                           "merged baselines; runs nothing")
  args = parser.parse_args(argv)
  if args.worker:
    worker(json.loads(args.worker))
    sys.stdout.flush()
    os._exit(0)  # not waiting for compiles still running in the pool (a mesh that stopped early)
  if args.merge:
    return merge(args.merge.split(","), args.out_dir, args.tag, args.markdown)

  import signal
  signal.signal(signal.SIGTERM, _stop_workers)
  signal.signal(signal.SIGINT, _stop_workers)
  start = time.time()
  hard_end = start + args.budget_s
  os.makedirs(args.out_dir, exist_ok=True)
  lines_log: list[str] = []

  def log(text: str) -> None:
    print(text, flush=True)
    lines_log.append(text)

  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                  env.get("PYTHONPATH", "")) if p)
  info = probe(env)
  n = info["count"]
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m not in MODELS:
      raise ValueError(f"--models has {m!r}; expected some of {MODELS}")
  size = ("tiny" if args.smoke else args.size if args.size != "auto"
          else "370m" if n <= 2 else "1.4b")
  if args.smoke:
    seqs, search_cap = [64, 128], min(args.max_seq, 512)
    meshes = args.meshes.split(",") if args.meshes else SMOKE_MESHES
    loss_chunk = 32
  else:
    seqs, search_cap = sorted(int(x) for x in args.seqs.split(",")), args.max_seq
    meshes = (args.meshes.split(",") if args.meshes
              else DEFAULT_MESHES.get(n) or DEFAULT_MESHES[max(k for k in DEFAULT_MESHES
                                                               if k <= n)])
    loss_chunk = args.loss_chunk
  for mesh in meshes:
    parse_mesh(mesh)
  meshes = [m for m in meshes if mesh_devices(m) <= n]
  attention = (None if args.attention == "xla" else
               ("cudnn" if info["platform"] == "gpu" else None)
               if args.attention == "auto" else args.attention)
  search = [max(seqs) * 2 ** k for k in range(1, 64) if max(seqs) * 2 ** k <= search_cap]
  header = (f"{n} x {info['kind']} ({info['platform']}), size {size}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"jax {info['versions']['jax']}")
  log(f"bench_scaling: {header}; meshes {meshes}; lengths {seqs}; search {search}; "
      f"budget {args.budget_s:.0f} s")

  jobs = []
  records: list[dict] = []
  for model in models:
    for mesh in meshes:
      if model == "transformerpp" and parse_mesh(mesh)[2] > 1:
        records.append(dict(model=model, mesh=mesh, event="not_applicable",
                            reason="sequence parallelism does not cover attention"))
        continue
      jobs.append((model, mesh))
  # Baselines first (the efficiencies need them), then the meshes, model by model.
  jobs.sort(key=lambda j: (models.index(j[0]), mesh_devices(j[1]) != 1))
  search_meshes = set(args.search_meshes.split(",")) if args.search_meshes else set(meshes)
  search_jobs = [j for j in jobs if j[1] in search_meshes] if search_cap else []
  timed_end = (start + args.budget_s * (1 - args.search_share) if search_jobs
               else hard_end)

  def run_pass(pass_jobs, end, lengths_of, what):
    for i, (model, mesh) in enumerate(pass_jobs):
      timed, probes = lengths_of(model, mesh)
      if not timed and not probes:
        continue
      remaining = end - time.time()
      if remaining < MIN_START_S:
        records.append(dict(model=model, mesh=mesh, event="skipped", seq=(timed or probes)[0],
                            reason="time budget"))
        log(f"[{what} {model} {mesh}] not started: {remaining:.0f} s left")
        continue
      share = remaining / (len(pass_jobs) - i)
      spec = dict(model=model, mesh=mesh, size=size, smoke=args.smoke, seqs=timed,
                  search=probes, steps=args.steps, deadline=time.time() + share,
                  loss_chunk=loss_chunk, attention=attention, ssd_impl=args.ssd_impl)
      log(f"[{what} {model} {mesh}] lengths {timed + probes}; share {share:.0f} s of "
          f"{remaining:.0f} s")
      records.extend(run_job(spec, env, hard_end, log))

  # Pass 1: the timed lengths on every mesh. Pass 2: the doubling search from twice the
  # longest length that trained in pass 1, on the search meshes.
  run_pass(jobs, timed_end, lambda model, mesh: (seqs, []), "timed")

  def probes(model, mesh):
    done = [r["seq"] for r in records if r.get("model") == model and r.get("mesh") == mesh
            and r["event"] == "ok"]
    failed = any(r.get("model") == model and r.get("mesh") == mesh and r["event"] in
                 ("oom", "error", "crash") for r in records)
    if not done or failed:
      return [], []
    first = max(2 * max(done), args.search_from)
    return [], [first * 2 ** k for k in range(64) if first * 2 ** k <= search_cap]

  run_pass(search_jobs, hard_end, probes, "search")

  summary = summarize(records, meshes, models, search_cap)
  table = markdown(summary, header)
  log("\n" + table)
  png = os.path.join(args.out_dir, f"{args.tag}.png")
  png_note = plot(summary, png, header) if summary["rows"] or summary["longest"] else "no rows"
  if png_note:
    log(png_note)
    png = None
  md_path = args.markdown or os.path.join(args.out_dir, f"{args.tag}.md")
  with open(md_path, "a") as f:
    f.write(table + "\n\n")
  result = dict(script="scripts/bench_scaling.py", date=datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"), device=info, size=size,
      smoke=args.smoke, meshes=meshes, seqs=seqs, search=search, steps=args.steps,
      budget_s=args.budget_s, attention=attention, ssd_impl=args.ssd_impl,
      env={k: os.environ.get(k) for k in (
          "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
          "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
      records=records, **summary, table=table, png=png,
      seconds=round(time.time() - start, 1), python=platform.python_version())
  json_path = os.path.join(args.out_dir, f"{args.tag}.json")
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1)
  log(f"wrote {json_path}, {md_path}{', ' + png if png else ''} ({result['seconds']} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
