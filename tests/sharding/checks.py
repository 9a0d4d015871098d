"""Multi-device checks run in a subprocess with 8 host CPU devices (see ``run_checks``).

``python -m tests.sharding.checks <check> [args]`` prints one JSON object of relative
errors (sharded vs one device, float64) or counts; the pytest modules assert on it. Each
check compares against the unsharded ops / model, never against shapes alone.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_checks(check: str, *args: str, devices: int = 8, timeout: int = 600,
               env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs ``check`` in a fresh python with ``devices`` CPU devices and float64; its JSON."""
  full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", **(env or {})}
  proc = subprocess.run([sys.executable, "-m", "tests.sharding.checks", check, *args],
                        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"check {check} {args} failed (rc {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denom = np.linalg.norm(b.ravel())
  return float(np.linalg.norm((a - b).ravel()) / denom) if denom else float(
      np.linalg.norm(a.ravel()))


def _tree_rel(a, b) -> float:
  import jax
  return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _mesh(spec: str):
  import jax
  from mamba_jax.sharding.mesh import MeshConfig, make_mesh
  config = MeshConfig.from_string(spec)
  n = 1
  for size in config.sizes:
    n *= size
  return make_mesh(config, jax.devices()[:n])


def check_ops(spec: str) -> dict[str, float]:
  """SSD / selective scan / conv, sequence(-and-tensor)-parallel vs the single-device ops:
  forward, final states and the gradient of a loss of both, with initial states and seq_idx
  resets on and across shard boundaries; 36 positions (9 per device on sequence=4) with
  chunk 4, so shards are not a multiple of the chunk."""
  import jax
  import jax.numpy as jnp
  from mamba_jax.ops.causal_conv1d import causal_conv1d
  from mamba_jax.ops.selective_scan import selective_scan
  from mamba_jax.ops.ssd import ssd
  from mamba_jax.sharding import sequence_parallel as sp

  mesh = _mesh(spec)
  tensor = "tensor" if mesh.shape["tensor"] > 1 else None
  k = jax.random.split(jax.random.key(0), 12)
  f = jnp.float64
  b, l, h, p, g, n, e = 2, 36, 4, 3, 2, 5, 8
  normal = lambda i, shape: jax.random.normal(k[i], shape, f)
  # Resets at 5, 17 (inside shards of 9), 21; row 2 resets exactly at the boundary 9.
  seq = jnp.array([[0] * 5 + [1] * 12 + [2] * 4 + [3] * 15, [0] * 9 + [1] * 27])
  out: dict[str, float] = {}

  def compare(name, ref_fn, par_fn, args):
    loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(jnp.sin(fn(*a)[1]))
    argnums = tuple(range(len(args)))
    ref, par = ref_fn(*args), jax.jit(par_fn)(*args)
    out[f"{name}_y"], out[f"{name}_state"] = _rel(par[0], ref[0]), _rel(par[1], ref[1])
    g_ref = jax.grad(loss(ref_fn), argnums)(*args)
    g_par = jax.jit(jax.grad(loss(par_fn), argnums))(*args)
    out[f"{name}_grad"] = _tree_rel(g_par, g_ref)

  x, dt, z = normal(0, (b, l, h, p)), normal(1, (b, l, h)), normal(6, (b, l, h, p))
  A = -jnp.exp(normal(2, (h,)))
  B, C = normal(3, (b, l, g, n)), normal(4, (b, l, g, n))
  kw = dict(chunk_size=4, D=normal(5, (h,)), z=z, dt_bias=normal(7, (h,)), dt_softplus=True,
            return_final_states=True)
  for name, extra in (("ssd", {}), ("ssd_init_seq", dict(initial_states=normal(8, (b, h, p, n)),
                                                         seq_idx=seq))):
    compare(name, functools.partial(ssd, impl="sequential", **kw, **extra),
            functools.partial(sp.ssd_sequence_parallel, **kw, **extra, mesh=mesh,
                              head_axis=tensor), (x, dt, A, B, C))

  u, delta = normal(0, (b, l, e)), normal(1, (b, l, e))
  A_s = -jnp.exp(normal(2, (e, n)))
  kw = dict(D=normal(5, (e,)), z=normal(6, (b, l, e)), delta_bias=normal(7, (e,)),
            delta_softplus=True, initial_state=normal(8, (b, e, n)), return_final_state=True)
  compare("scan", functools.partial(selective_scan, impl="sequential", **kw),
          functools.partial(sp.selective_scan_sequence_parallel, **kw, mesh=mesh,
                            channel_axis=tensor), (u, delta, A_s, normal(3, (b, l, n)),
                                                   normal(4, (b, l, n))))
  compare("scan_grouped", functools.partial(selective_scan, impl="sequential", **kw),
          functools.partial(sp.selective_scan_sequence_parallel, **kw, mesh=mesh,
                            channel_axis=tensor), (u, delta, A_s, normal(3, (b, l, 2, n)),
                                                   normal(4, (b, l, 2, n))))
  kw = dict(activation="silu", initial_states=normal(3, (b, e, 3)), seq_idx=seq,
            return_final_states=True)
  compare("conv", functools.partial(causal_conv1d, **kw),
          functools.partial(sp.causal_conv1d_sequence_parallel, **kw, mesh=mesh,
                            channel_axis=tensor), (u, normal(1, (e, 4)), normal(2, (e,))))
  return out


def check_ops_pallas(spec: str) -> dict[str, float]:
  """Sequence(-and-tensor)-parallel SSD with the Pallas kernels as the per-device op
  (interpret mode on CPU; float32 inputs, shapes the kernels tile), against the sequential
  oracle in float64: forward, final states and gradients, with initial states and a reset
  that falls inside a shard."""
  import jax
  import jax.numpy as jnp
  from mamba_jax.ops.ssd import ssd
  from mamba_jax.sharding import sequence_parallel as sp

  mesh = _mesh(spec)
  tensor = "tensor" if mesh.shape["tensor"] > 1 else None
  k = jax.random.split(jax.random.key(1), 10)
  b, l, h, p, g, n = 1, 96, 4, 16, 2, 16  # shards of 48 (sequence = 2): not a chunk multiple
  normal = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)
  seq = jnp.array([[0] * 30 + [1] * 66])
  x, dt = normal(0, (b, l, h, p)), normal(1, (b, l, h))
  A = -jnp.exp(normal(2, (h,)))
  B, C = normal(3, (b, l, g, n)), normal(4, (b, l, g, n))
  kw = dict(chunk_size=16, D=normal(5, (h,)), dt_bias=normal(7, (h,)), dt_softplus=True,
            initial_states=normal(8, (b, h, p, n)), seq_idx=seq, return_final_states=True)
  args = (x, dt, A, B, C)
  up = lambda tree: jax.tree.map(lambda v: v.astype(jnp.float64) if isinstance(v, jax.Array)
                                 and jnp.issubdtype(v.dtype, jnp.floating) else v, tree)
  ref_fn = functools.partial(ssd, impl="sequential", **up(kw))
  par_fn = functools.partial(sp.ssd_sequence_parallel, **kw, mesh=mesh, head_axis=tensor,
                             ssd_fn=functools.partial(ssd, impl="pallas"))
  loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(jnp.sin(fn(*a)[1]))
  ref, par = ref_fn(*up(args)), jax.jit(par_fn)(*args)
  argnums = tuple(range(len(args)))
  g_ref = jax.grad(loss(ref_fn), argnums)(*up(args))
  g_par = jax.jit(jax.grad(loss(par_fn), argnums))(*args)
  return {"y": _rel(par[0], ref[0]), "state": _rel(par[1], ref[1]),
          "grad": _tree_rel(g_par, g_ref)}


def _tiny(layer: str):
  import jax.numpy as jnp
  from flax import nnx
  from mamba_jax.config import MambaConfig
  from mamba_jax.nn.lm import MambaLM
  config = MambaConfig.tiny(layer=layer)
  if config.ssm_layer == "Mamba2":  # ngroups 4: tensor = 2 or 4 holds whole groups
    config = config.replace(ssm_cfg={**config.ssm_cfg, "ngroups": 4})
  model = MambaLM(config, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  return config, model


def check_model(layer: str, parallel: str, *specs: str) -> dict[str, Any]:
  """Loss, logits and every parameter gradient of a tiny MambaLM under each mesh of
  ``specs`` vs one device. ``parallel``: "mixers" (parallelize: TP/SP mixer forwards) or
  "gspmd" (the model's own forward, XLA partitions it from the parameter shardings)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from mamba_jax.sharding.mesh import validate_mesh
  from mamba_jax.sharding.parallel_mixers import parallelize
  from mamba_jax.sharding.shard import batch_sharding, shard

  config, model = _tiny(layer)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b, l = 8, 32  # batch 8: data = 8 and fsdp = 8 hold one row each
  ids = jax.random.randint(jax.random.key(1), (b, l), 0, config.vocab_size)
  targets = jnp.roll(ids, -1, axis=1)
  seq = (jnp.array([[0] * 5 + [1] * 12 + [2] * 15] * 4 + [[0] * 8 + [1] * 24] * 4)
         if layer in ("Mamba2", "hybrid") else None)

  def loss_fn(params, ids, targets, seq, mesh=None):
    model = nnx.merge(graphdef, params, rest)
    if mesh is not None and parallel == "mixers":
      parallelize(model, mesh)
    logits = model(ids, seq_idx=seq)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, ids, targets, seq)
  out: dict[str, Any] = {}
  for spec in specs:
    mesh = _mesh(spec)
    validate_mesh(mesh, config, batch=b, length=l)
    put = lambda x: None if x is None else jax.device_put(x, batch_sharding(mesh))
    fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, mesh=mesh), has_aux=True))
    (s_loss, s_logits), s_grads = fn(shard(params, config, mesh), put(ids), put(targets),
                                     put(seq))
    out[spec] = dict(loss=_rel(s_loss, loss), logits=_rel(s_logits, logits),
                     grads=_tree_rel(s_grads, grads))
  return out


def check_float32(spec: str) -> dict[str, float]:
  """A float32 tiny Mamba-2 LM (dtype and parameters float32) under ``spec`` vs one device."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from mamba_jax.config import MambaConfig
  from mamba_jax.nn.lm import MambaLM
  from mamba_jax.sharding.parallel_mixers import parallelize
  from mamba_jax.sharding.shard import batch_sharding, shard

  config = MambaConfig.tiny(layer="Mamba2")
  config = config.replace(ssm_cfg={**config.ssm_cfg, "ngroups": 2})
  graphdef, params, rest = nnx.split(MambaLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  ids = jax.random.randint(jax.random.key(1), (4, 32), 0, config.vocab_size)

  def loss_fn(params, ids, mesh=None):
    model = nnx.merge(graphdef, params, rest)
    if mesh is not None:
      parallelize(model, mesh)
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], ids[:, 1:]).mean(), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, ids)
  mesh = _mesh(spec)
  fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, mesh=mesh), has_aux=True))
  (s_loss, s_logits), s_grads = fn(shard(params, config, mesh),
                                   jax.device_put(ids, batch_sharding(mesh)))
  return dict(loss=_rel(s_loss, loss), logits=_rel(s_logits, logits),
              grads=_tree_rel(s_grads, grads), dtype=str(s_logits.dtype))


def check_allreduce(layer: str) -> dict[str, int]:
  """Collectives in the compiled forward of one mixer under tensor = 2 (ParallelMixer)."""
  import jax
  import re
  from flax import nnx
  from mamba_jax.sharding.parallel_mixers import ParallelMixer
  from mamba_jax.sharding.rules import rules_for_mesh
  from mamba_jax.sharding.shard import shard

  config, model = _tiny(layer)
  mesh = _mesh("tensor=2")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = shard(params, config, mesh)

  def forward(params, u):
    mixer = nnx.merge(graphdef, params, rest).backbone.layers[0].mixer
    return ParallelMixer(mixer, mesh, rules_for_mesh(mesh))(u)

  u = jax.random.normal(jax.random.key(0), (2, 16, config.d_model))
  text = jax.jit(forward).lower(params, u).compile().as_text()
  ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
  counts = {op: len(re.findall(rf"= \S+ {op}(-start)?\(", text)) for op in ops}
  return counts


def _mixer_bytes_per_device(params: Any, device: Any) -> int:
  """Bytes of the arrays of ``params`` stored on ``device`` (its addressable shards)."""
  import jax
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
             for shard in leaf.addressable_shards if shard.device == device)


def check_tp_shards() -> dict[str, Any]:
  """Under tensor = 2, each device holds only its half of a Mamba-2 mixer's in_proj and conv
  (the grouped layout: whole groups per device) and the right columns of it; the mixer's
  bytes per device with the grouped layout sharded vs in_proj / conv replicated (the
  table before the grouped layout: their axes mapped to no mesh axis)."""
  import jax
  import numpy as np
  from flax import nnx
  from mamba_jax.sharding import logical as lg
  from mamba_jax.sharding.rules import rules_for_mesh
  from mamba_jax.sharding.shard import shard

  config, model = _tiny("Mamba2")  # ngroups 4, 4 heads of 16, d_state 8, float64
  mesh = _mesh("tensor=2")
  mixer = model.backbone.layers[0].mixer
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  placed = shard(params, config, mesh)["backbone"]["layers"][0]["mixer"]
  host = params["backbone"]["layers"][0]["mixer"]
  h, p, g, n, s = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state, mixer.d_ssm
  in_idx, conv_idx = mixer.mamba_ssm_order()
  out: dict[str, Any] = {"in_proj_spec": str(placed["in_proj"]["kernel"].sharding.spec),
                         "conv_spec": str(placed["conv1d"]["kernel"].sharding.spec)}
  cols, chans = in_idx.size, conv_idx.size
  wrong = []
  for shard_ in placed["in_proj"]["kernel"].addressable_shards:
    i = mesh.devices.ravel().tolist().index(shard_.device)
    lo, hi = i * cols // 2, (i + 1) * cols // 2
    if shard_.data.shape != (config.d_model, cols // 2):
      wrong.append(f"in_proj shard {i} shape {shard_.data.shape}")
    if not np.array_equal(np.asarray(shard_.data), np.asarray(host["in_proj"]["kernel"])[:, lo:hi]):
      wrong.append(f"in_proj shard {i} values")
    # Device i's groups 2i, 2i+1 hold heads 2i, 2i+1 (one head per group here): their z,
    # x, dt columns and the groups' B, C columns in mamba_ssm's order, nothing else.
    heads, groups = range(i * h // 2, (i + 1) * h // 2), range(i * g // 2, (i + 1) * g // 2)
    b_at, c_at, dt_at = 2 * s, 2 * s + g * n, 2 * s + 2 * g * n
    expected = {c for k in heads for c in (*range(k * p, (k + 1) * p),
                                            *range(s + k * p, s + (k + 1) * p), dt_at + k)}
    expected |= {c for j in groups for c in (*range(b_at + j * n, b_at + (j + 1) * n),
                                             *range(c_at + j * n, c_at + (j + 1) * n))}
    if set(in_idx[lo:hi].tolist()) != expected:
      wrong.append(f"in_proj shard {i} holds mamba_ssm columns {sorted(in_idx[lo:hi])}")
  for name, whole in (("kernel", (chans // 2, mixer.d_conv)), ("bias", (chans // 2,))):
    for shard_ in placed["conv1d"][name].addressable_shards:
      if shard_.data.shape != whole:
        wrong.append(f"conv1d {name} shard shape {shard_.data.shape}")
  out["wrong"] = wrong
  out["shards_per_array"] = len(placed["in_proj"]["kernel"].addressable_shards)
  replicated = dict(rules_for_mesh(mesh))
  for name in (lg.IN_PROJ_GROUPED, lg.CONV_GROUPED):
    replicated.pop(name)
  before = shard(params, config, mesh, replicated)["backbone"]["layers"][0]["mixer"]
  device = mesh.devices.ravel()[0]
  out["bytes_before"] = _mixer_bytes_per_device(before, device)
  out["bytes_after"] = _mixer_bytes_per_device(placed, device)
  out["bytes_total"] = sum(leaf.nbytes for leaf in jax.tree.leaves(host))
  return out


def check_tp_shards_mamba1() -> dict[str, Any]:
  """Under tensor = 2, each device holds only its half of a gated Mamba-1 mixer's in_proj
  (the interleaved layout: the x and z columns of its own channels) and the right columns
  of it; the mixer's bytes per device with in_proj sharded vs replicated (the table before
  the interleaved layout: its axis mapped to no mesh axis); and the ParallelMixer forward
  from those shards vs the mixer on one device."""
  import jax
  import numpy as np
  from flax import nnx
  from mamba_jax.sharding import logical as lg
  from mamba_jax.sharding.parallel_mixers import ParallelMixer
  from mamba_jax.sharding.rules import rules_for_mesh
  from mamba_jax.sharding.shard import shard

  config, model = _tiny("Mamba1")  # d_model 32, d_inner 64, float64
  mesh = _mesh("tensor=2")
  mixer = model.backbone.layers[0].mixer
  e = mixer.d_inner
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sharded = shard(params, config, mesh)
  placed = nnx.to_pure_dict(sharded)["backbone"]["layers"][0]["mixer"]
  host = nnx.to_pure_dict(params)["backbone"]["layers"][0]["mixer"]
  in_idx = mixer.mamba_ssm_order()
  kernel = placed["in_proj"]["kernel"]
  out: dict[str, Any] = {"in_proj_spec": str(kernel.sharding.spec),
                         "shards_per_array": len(kernel.addressable_shards)}
  wrong = []
  for shard_ in kernel.addressable_shards:
    i = mesh.devices.ravel().tolist().index(shard_.device)
    lo, hi = i * e, (i + 1) * e  # of the 2e columns
    if shard_.data.shape != (config.d_model, e):
      wrong.append(f"in_proj shard {i} shape {shard_.data.shape}")
    if not np.array_equal(np.asarray(shard_.data), np.asarray(host["in_proj"]["kernel"])[:, lo:hi]):
      wrong.append(f"in_proj shard {i} values")
    # Device i's channels [i·e/2, (i+1)·e/2): their x columns (mamba_ssm's c) and z columns
    # (mamba_ssm's e + c), nothing else.
    channels = range(i * e // 2, (i + 1) * e // 2)
    expected = {*channels, *(e + c for c in channels)}
    if set(in_idx[lo:hi].tolist()) != expected:
      wrong.append(f"in_proj shard {i} holds mamba_ssm columns {sorted(in_idx[lo:hi])}")
  out["wrong"] = wrong
  replicated = dict(rules_for_mesh(mesh))
  replicated.pop(lg.IN_PROJ_INTERLEAVED)
  before = nnx.to_pure_dict(shard(params, config, mesh, replicated))
  before = before["backbone"]["layers"][0]["mixer"]
  device = mesh.devices.ravel()[0]
  out["bytes_before"] = _mixer_bytes_per_device(before, device)
  out["bytes_after"] = _mixer_bytes_per_device(placed, device)
  out["bytes_total"] = sum(leaf.nbytes for leaf in jax.tree.leaves(host))

  def forward(params, u, mesh=None):
    mixer = nnx.merge(graphdef, params, rest).backbone.layers[0].mixer
    return mixer(u) if mesh is None else ParallelMixer(mixer, mesh, rules_for_mesh(mesh))(u)

  u = jax.random.normal(jax.random.key(0), (2, 16, config.d_model), np.float64)
  reference = jax.jit(forward)(params, u)
  out["forward"] = _rel(jax.jit(functools.partial(forward, mesh=mesh))(sharded, u), reference)
  return out


def check_training(spec: str, restore_spec: str, directory: str) -> dict[str, Any]:
  """Three AdamW steps of the training package's train step, the state sharded over
  ``spec`` (the model's own forward, partitioned by XLA) vs one device; then the sharded
  state saved with orbax and restored onto ``restore_spec``."""
  import jax
  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp
  from flax import nnx
  from mamba_jax.nn.lm import weight_decay_mask
  from mamba_jax.sharding.shard import abstract_tree, batch_sharding, shard
  from mamba_jax.training.train_step import init_train_state, make_train_step

  config, model = _tiny("Mamba2")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2, weight_decay=0.1, mask=weight_decay_mask(model))
  ids = jax.random.randint(jax.random.key(1), (4, 17), 0, config.vocab_size)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": jnp.ones((4, 16), bool)}

  def run(state, batch):
    step = make_train_step(graphdef, rest, tx, config.vocab_size)
    for _ in range(3):
      state, _ = step(state, batch)
    return state

  fresh = lambda: init_train_state(jax.tree.map(jnp.copy, params), tx)  # steps donate
  ref = run(fresh(), batch)
  mesh = _mesh(spec)
  state = shard(fresh(), config, mesh)
  state = run(state, jax.device_put(batch, batch_sharding(mesh)))
  out = {"params": _tree_rel(state["params"], ref["params"]),
         "opt_state": _tree_rel(state["opt_state"], ref["opt_state"]),
         "step": int(state["step"])}
  path = os.path.join(directory, "state")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  target = _mesh(restore_spec)
  restored = checkpointer.restore(path, abstract_tree(state, config, target))
  out["restored"] = _tree_rel(restored, state)
  kernel = restored["params"]["backbone"]["layers"][0]["mixer"]["out_proj"]["kernel"]
  out["restored_spec"] = str(kernel[...].sharding.spec)
  return out


def check_multiprocess(process_id: str, port: str) -> dict[str, Any]:
  """One of two processes × 4 CPU devices: a data=2, tensor=2, sequence=2 loss and gradient
  of a tiny Mamba-2 LM across both processes vs this process alone on one device."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  import numpy as np
  import optax
  from flax import nnx
  from jax.experimental import multihost_utils
  from mamba_jax.sharding.parallel_mixers import parallelize
  from mamba_jax.sharding.shard import batch_sharding, tree_shardings

  config, model = _tiny("Mamba2")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = np.asarray(jax.random.randint(jax.random.key(1), (4, 32), 0, config.vocab_size))
  # Both runs take these (eagerly initialised) parameter values. A jitted initialisation
  # (sharded_init) is not bit-identical: dt_bias = softplus⁻¹(exp(·)) is computed in float32
  # (init.dt_bias_init), and XLA:CPU's fused float32 exp / log / expm1 under jit differ from
  # the eager kernels in the last bits (dt_bias relative difference 2.5e-8), which moved the
  # gradients by 1.4e-7. Given the same values, the two-process gradients agree to 1e-15.
  host_params = jax.tree.map(np.asarray, params)

  def loss_fn(params, ids, mesh=None):
    model = nnx.merge(graphdef, params, rest)
    if mesh is not None:
      parallelize(model, mesh)
    logits = model(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  local = jax.local_devices()[0]
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(jax.device_put(params, local),
                                                             jax.device_put(ids, local))
  mesh = _mesh("data=2,tensor=2,sequence=2")
  shardings = tree_shardings(host_params, config, mesh)
  g_params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      host_params, shardings)
  sharding = batch_sharding(mesh)
  g_ids = jax.make_array_from_callback(ids.shape, sharding, lambda index: ids[index])
  loss, grads = jax.jit(jax.value_and_grad(lambda p, i: loss_fn(p, i, mesh)))(g_params, g_ids)
  grads = multihost_utils.process_allgather(grads, tiled=True)
  placed = multihost_utils.process_allgather(g_params, tiled=True)
  return {"process": jax.process_index(), "devices": jax.device_count(),
          "params": _tree_rel(placed, params),
          "loss": _rel(loss.addressable_data(0), ref_loss),
          "grads": _tree_rel(grads, ref_grads)}


def main() -> None:
  check, args = sys.argv[1], sys.argv[2:]
  result = {"ops": check_ops, "ops_pallas": check_ops_pallas, "model": check_model, "float32": check_float32,
            "allreduce": check_allreduce, "training": check_training,
            "multiprocess": check_multiprocess, "tp_shards": check_tp_shards,
            "tp_shards_mamba1": check_tp_shards_mamba1}[check](*args)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
