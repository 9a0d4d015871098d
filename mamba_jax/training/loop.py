"""``train_and_evaluate(config, workdir)``: train each model row of a config, evaluate, report.

A config (see ``experiments/configs/``) describes one table or figure of a paper: a task, a
base model, the optimizer and the schedule, and ``rows``, the models to compare. Each row
trains in ``workdir/<row slug>/`` with its own checkpoints and metrics; the final evaluation
of every row goes to ``workdir/results.json`` and ``workdir/results.md``
(``mamba_jax.training.results``).

Resuming: each row restores its latest checkpoint (params, optimizer state, step, data iterator
state), so rerunning a killed command continues it and ends with the same parameters as an
uninterrupted run (on CPU, bit for bit). A row that finished keeps its ``final_eval.json`` and
is not retrained.

Config fields read here (besides ``optimizer``, ``model``, ``task``; see the config files):
  seed, data_seed, eval_seed      model init, training data and evaluation data seeds
  batch_size                      global micro-batch size B (records per train step)
  num_train_steps                 optimizer steps (micro-steps = this × grad_accum_steps)
  eval_tasks                      {label: task field overrides}, reported as accuracy@label
                                  ("" : plain accuracy); "batch_size" / "num_batches" in the
                                  overrides replace eval_batch_size / eval_batches
  eval_batch_size, eval_batches   evaluation records = eval_batch_size × eval_batches per task
  max_eval_length                 0, or skip (report None for) evaluations longer than this
  log_every_steps, eval_every_steps, checkpoint_every_steps, max_to_keep, async_checkpoint
  skip_nonfinite                  False: stop on a non-finite loss/gradient/update; True: skip
                                  the update and count it
  profile_steps                   () or (first, last): jax.profiler trace of those micro-steps
  compute_dtype                   "float32" | "bfloat16" (the model's dtype; params float32)
  remat                           0, or rematerialize every residual block in the backward
                                  (1), or groups of that many blocks (an int >= 2;
                                  activation memory; train_step.make_train_step)
  loss_chunk                      0, or the LM head and loss taken this many positions at
                                  a time (language models; logits memory)
  classifier                      absent, or {"num_classes", "pooling"}: a sequence classifier
                                  (models.build_model) scored on its (b, 1, classes) logits
  data_threads                    grain reader threads
  only_rows                       "" (all rows), or comma-separated row names to train
  mesh                            {data, fsdp, tensor, sequence}: the device mesh
                                  (mamba_jax.sharding.mesh.MeshConfig; -1 = the rest)

Sharding (docs/sharding.md). Every row runs on one mesh of all devices (``devices`` to take
fewer), checked against the model, the batch size and every sequence length before anything
is compiled (ValueError naming the size that does not divide). Parameters and optimizer
state are placed by the logical rules of ``mamba_jax.sharding`` (replicated over ``data``,
split over ``fsdp`` / ``tensor``); each process's grain batches become global (B, l) arrays
split over data × fsdp (and the length over ``sequence``); the train and eval steps are
jitted with these in/out shardings, the state donated. With ``tensor`` or ``sequence`` > 1
the SSM mixers run their tensor / sequence-parallel forwards (``parallel_mixers``). The
parameters are initialised on one device, as without a mesh (the same values whatever the
mesh), then placed. Checkpoints hold the sharded arrays and are restored onto the current
mesh, which may differ from the one they were saved from.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from mamba_jax.config import MambaConfig
from mamba_jax.data import pipeline
from mamba_jax.data.tasks import make_task
from mamba_jax.sharding import logical as lg
from mamba_jax.sharding.mesh import (AXES, BATCH_AXES, MeshConfig, axis_size, make_mesh,
                                     validate_mesh)
from mamba_jax.sharding.shard import batch_spec, partition_specs
from mamba_jax.training import models
from mamba_jax.training import results as results_lib
from mamba_jax.training.checkpointing import Checkpointer
from mamba_jax.training.metrics import MetricsWriter, Progress, model_flops_utilization
from mamba_jax.training.optimizer import learning_rate_schedule, make_optimizer
from mamba_jax.training.train_step import init_train_state, make_eval_step, make_train_step

_ROW_OVERRIDES = ("model", "task", "eval_tasks", "optimizer", "num_train_steps", "batch_size",
                  "max_eval_length")
# Row keys copied into the results row as they are (not used for training).
_ROW_LABELS = ("paper", "tags")


class NonFiniteError(RuntimeError):
  """A train step produced a non-finite loss, gradient norm or update."""


def slug(name: str) -> str:
  """A directory name for a row: lower case, [a-z0-9_-] only."""
  out = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
  if not out:
    raise ValueError(f"row name {name!r} has no letters or digits")
  return out


def row_config(config: ml_collections.ConfigDict, row: Mapping[str, Any]
               ) -> ml_collections.ConfigDict:
  """The config of one row: ``config`` with the row's overrides (model fields merged)."""
  allowed = ("name", *_ROW_LABELS, *_ROW_OVERRIDES)
  unknown = sorted(set(row) - set(allowed))
  if unknown:
    raise ValueError(f"rows entry {row.get('name')!r} has unknown keys {unknown}; expected "
                     f"some of {list(allowed)}")
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.name = row["name"]
  cfg.model = models.merge_model_fields(config.model, row.get("model", {}))
  for key in ("task", "optimizer"):
    if key in row:
      cfg[key].update(dict(row[key]))
  for key in ("eval_tasks", "num_train_steps", "batch_size", "max_eval_length"):
    if key in row:
      cfg[key] = row[key]
  return cfg


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh`` (data=-1 over all devices when the config has none).

  Raises:
    ValueError: unknown keys in ``config.mesh``, or sizes that are not positive ints / -1
      or do not multiply to the number of devices (mamba_jax.sharding.mesh's message).
  """
  fields = dict(config.mesh.to_dict() if hasattr(config.get("mesh"), "to_dict")
                else config.get("mesh") or {})
  unknown = sorted(set(fields) - set(AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown keys {unknown}; expected some of {list(AXES)}")
  try:
    return make_mesh(MeshConfig(**fields), devices)
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from e


def _parallel_mixers(mesh: jax.sharding.Mesh, model_config: MambaConfig) -> bool:
  """Whether the SSM mixers take their tensor / sequence-parallel forwards: tensor or
  sequence > 1 and mixers that have one (H3 under tensor is left to XLA's partitioner;
  validate_mesh refuses it under sequence)."""
  split = axis_size(mesh, "tensor") > 1 or axis_size(mesh, "sequence") > 1
  return split and model_config.ssm_layer != "H3"


# A SequenceClassifier's head (d_model -> classes) is not in the logical-axis table: it is
# small, so it is replicated.
_CLASSIFIER_HEAD = re.compile(r"(^|/)head/(kernel|bias)$")


def state_shardings(tree: Any, model_config: MambaConfig, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings of a train state (or params) by the logical rules of the mesh
  (``shard.partition_specs``); a classifier head is replicated."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [lg.path_string(path) for path, _ in flat]
  covered = {n: x for n, (_, x) in zip(names, flat) if not _CLASSIFIER_HEAD.search(n)}
  specs = partition_specs(covered, model_config, mesh)
  return jax.tree_util.tree_unflatten(treedef, [
      NamedSharding(mesh, specs.get(n, P())) for n in names])


def batch_shardings(mesh: jax.sharding.Mesh, record: Mapping[str, np.ndarray]
                    ) -> dict[str, NamedSharding]:
  """{key: NamedSharding} of batches of ``record``s: the batch over data × fsdp; arrays with
  a length axis (as long as the inputs') also over ``sequence`` (shard.batch_spec); others
  (a classifier's targets) over the batch only."""
  full = batch_spec(mesh)
  length = np.shape(record["inputs"])[0]
  out = {}
  for key, value in record.items():
    shape = np.shape(value)
    spec = full if shape and shape[0] == length else P(full[0])
    out[key] = NamedSharding(mesh, spec)
  return out


def _to_global(batch: dict[str, np.ndarray], shardings: Mapping[str, NamedSharding]
               ) -> dict[str, jax.Array]:
  """This process's (b, l) arrays → global (B = b · processes, l) arrays with ``shardings``.

  The global shape is given: each process holds whole rows (all of the length), and each
  device takes its slice of them, also when ``sequence`` spans processes.
  """
  count = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      shardings[k], v, (v.shape[0] * count, *v.shape[1:])) for k, v in batch.items()}


def _bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes of ``tree`` held by one device under ``shardings`` (even splits)."""
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _check_mesh(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                model_config: MambaConfig, train_len: int) -> None:
  """validate_mesh for the train batch / length and every evaluation's batch / length."""
  validate_mesh(mesh, model_config, batch=cfg.batch_size, length=train_len)
  ways = math.prod(axis_size(mesh, a) for a in BATCH_AXES)
  if ways % jax.process_count():
    raise ValueError(f"mesh data·fsdp = {ways} is not a multiple of the process count "
                     f"{jax.process_count()}: each process reads its own rows of every batch, "
                     "so the batch must be split over the processes (raise data or fsdp)")
  for label, overrides in cfg.eval_tasks.items():
    overrides = dict(overrides)
    batch = overrides.pop("batch_size", cfg.eval_batch_size)
    overrides.pop("num_batches", None)
    length = _task(cfg, overrides, cfg.eval_seed).seq_len
    if cfg.get("max_eval_length") and length > cfg.max_eval_length:
      continue
    try:
      validate_mesh(mesh, model_config, batch=batch, length=length)
    except ValueError as e:
      raise ValueError(f"evaluation {label!r} (batch {batch}, length {length}): {e}") from e


def _task(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any], seed: int):
  fields = {**cfg.task.to_dict(), **dict(overrides)}
  name = fields.pop("name")
  return make_task(name, seed=seed, **fields)


def evaluate(cfg: ml_collections.ConfigDict, eval_step, params,
             shardings: Mapping[str, NamedSharding]) -> dict[str, float | None]:
  """accuracy / loss on each of ``cfg.eval_tasks`` (None beyond ``max_eval_length``)."""
  out: dict[str, float | None] = {}
  for label, overrides in cfg.eval_tasks.items():
    suffix = f"@{label}" if label else ""
    overrides = dict(overrides)
    batch_size = overrides.pop("batch_size", cfg.eval_batch_size)
    num_batches = overrides.pop("num_batches", cfg.eval_batches)
    task = _task(cfg, overrides, cfg.eval_seed)
    if cfg.get("max_eval_length") and task.seq_len > cfg.max_eval_length:
      out[f"accuracy{suffix}"] = None
      continue
    sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in pipeline.eval_batches(task, batch_size, num_batches):
      part = jax.device_get(eval_step(params, _to_global(batch, shardings)))
      for k in sums:
        sums[k] += float(part[k])
    count = max(sums["count"], 1.0)
    out[f"accuracy{suffix}"] = sums["correct"] / count
    out[f"loss{suffix}"] = sums["loss_sum"] / count
    if hasattr(task, "loss_metrics"):  # e.g. perplexity, bits per byte of a text task
      out.update({f"{k}{suffix}": v for k, v in task.loss_metrics(out[f"loss{suffix}"]).items()})
  return out


def _check_intervals(cfg: ml_collections.ConfigDict) -> None:
  for name in ("batch_size", "num_train_steps", "log_every_steps", "eval_every_steps",
               "checkpoint_every_steps", "eval_batch_size", "eval_batches", "max_to_keep"):
    value = cfg[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be an int >= 1, got {value!r}")
  if cfg.profile_steps and (len(cfg.profile_steps) != 2
                            or not 0 <= cfg.profile_steps[0] < cfg.profile_steps[1]):
    raise ValueError(f"config.profile_steps must be () or (first, last) with "
                     f"0 <= first < last, got {cfg.profile_steps!r}")


def train_row(cfg: ml_collections.ConfigDict, workdir: str,
              mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """Trains (or resumes) one model row in ``workdir``; returns its final evaluation.

  ``mesh``: the device mesh, already checked against this row (``train_and_evaluate`` does);
  None: ``cfg.mesh`` over all devices, checked here.
  """
  _check_intervals(cfg)
  final_path = os.path.join(workdir, "final_eval.json")
  if os.path.exists(final_path):
    logging.info("%s: finished earlier, reading %s", cfg.name, final_path)
    with open(final_path, encoding="utf-8") as f:
      return json.load(f)

  model_config = models.model_config(cfg.model)
  train_task = _task(cfg, {}, cfg.data_seed)
  if mesh is None:
    mesh = mesh_from_config(cfg)
    _check_mesh(cfg, mesh, model_config, train_task.seq_len)
  parallel = _parallel_mixers(mesh, model_config)

  model = models.build_model(model_config, dtype_name=cfg.compute_dtype,
                             seed=cfg.seed, classifier=cfg.get("classifier"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  accum = cfg.optimizer.grad_accum_steps
  total_steps = cfg.num_train_steps * accum
  tx = make_optimizer(cfg.optimizer, cfg.num_train_steps, models.weight_decay_mask(model))
  schedule = learning_rate_schedule(cfg.optimizer, cfg.num_train_steps)
  vocab = models.output_size(cfg)
  # Parameters are initialised eagerly on one device (the same values on every mesh and
  # process), then placed by the rules; the optimizer state is created in its sharded layout.
  abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
  shardings = state_shardings(abstract, model_config, mesh)
  data_shardings = batch_shardings(mesh, train_task[0])
  train_step = make_train_step(graphdef, rest, tx, vocab, mesh=mesh,
                               state_shardings=shardings, batch_shardings=data_shardings,
                               parallel=parallel, remat=cfg.get("remat", False),
                               loss_chunk=cfg.get("loss_chunk", 0))
  eval_step = make_eval_step(graphdef, rest, vocab, mesh=mesh,
                             param_shardings=shardings["params"],
                             batch_shardings=data_shardings, parallel=parallel,
                             loss_chunk=cfg.get("loss_chunk", 0))
  del model
  param_bytes = _bytes_per_device(abstract["params"], shardings["params"])
  total_bytes = sum(x.size * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(abstract["params"]))
  logging.info("%s: mesh %s over %d devices (%s SSM mixers); per device: parameters %d of "
               "%d bytes (%.1f%%), optimizer state %d bytes", cfg.name, dict(mesh.shape),
               mesh.size, "tensor/sequence-parallel" if parallel else "plain", param_bytes,
               total_bytes, 100 * param_bytes / max(total_bytes, 1),
               _bytes_per_device(abstract["opt_state"], shardings["opt_state"]))

  data = pipeline.train_iterator(train_task, cfg.batch_size, num_threads=cfg.data_threads)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                      async_save=cfg.async_checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    # The target layout is this mesh's, whatever mesh the checkpoint was saved from.
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    state, data_state = ckpt.restore(start, target)
    data.set_state(data_state)
    logging.info("%s: resumed at step %d", cfg.name, start)
  else:
    params = jax.device_put(jax.device_get(params), shardings["params"])
    state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=shardings)(params)
  del params
  start = start or 0
  last_good = start if ckpt.latest_step() is not None else None

  writer = MetricsWriter(workdir, tensorboard=cfg.tensorboard)
  progress = Progress(total_steps, start, prefix=f"{cfg.name}: ")
  logging.info("%s: %d parameters, %d micro-steps of %d × %d tokens", cfg.name, num_params,
               total_steps, cfg.batch_size, train_task.seq_len)
  tokens_per_step = cfg.batch_size * train_task.seq_len
  # Throughput is timed from the end of this process's first step (which compiles).
  window_start, window_steps, window_sums, timed_steps = time.perf_counter(), 0, {}, 0
  profiling = False
  try:
    for step in range(start, total_steps):
      if cfg.profile_steps and step == cfg.profile_steps[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      batch = _to_global(next(data), data_shardings)
      state, metrics = train_step(state, batch)
      if not bool(metrics["finite"]):
        message = (f"{cfg.name}: non-finite loss, gradient or update at step {step + 1} "
                   f"(loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])})")
        if not cfg.skip_nonfinite:
          raise NonFiniteError(f"{message}; last good checkpoint: "
                               f"{'none' if last_good is None else f'step {last_good}'} "
                               f"in {ckpt.directory}")
        logging.warning("%s; skipped (%d so far)", message, int(state["nonfinite_count"]))
      if profiling and step + 1 == cfg.profile_steps[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      for k in ("loss", "accuracy", "grad_norm"):
        window_sums[k] = window_sums.get(k, 0.0) + metrics[k]
      window_steps += 1
      done = step + 1
      if step == start:
        first_step_s = time.perf_counter() - window_start
        logging.info("%s: first step (with compilation) took %.1f s", cfg.name, first_step_s)
        writer.write(done, {"first_step_s": first_step_s}, split="compile")
        window_start = time.perf_counter()
      else:
        timed_steps += 1
      if done % cfg.log_every_steps == 0 or done == total_steps:
        values = {k: v / window_steps for k, v in window_sums.items()}
        timing = {}
        if timed_steps:
          elapsed = time.perf_counter() - window_start
          tokens_per_s = tokens_per_step * timed_steps / elapsed
          timing = {"step_time_s": elapsed / timed_steps, "tokens_per_s": tokens_per_s,
                    "mfu": model_flops_utilization(num_params, tokens_per_s)}
        logged = writer.write(done, {
            **values, **timing, "learning_rate": schedule(done // accum),
            "nonfinite_count": state["nonfinite_count"]})
        progress.update(done, f"loss {logged['loss']:.4f} acc {logged['accuracy']:.3f}",
                        force=True)
        window_start, window_steps, window_sums, timed_steps = time.perf_counter(), 0, {}, 0
      else:
        progress.update(done)
      if done % cfg.eval_every_steps == 0 and done != total_steps:
        eval_start = time.perf_counter()
        writer.write(done, evaluate(cfg, eval_step, state["params"], data_shardings), split="eval")
        window_start += time.perf_counter() - eval_start  # not a train step's time
      if done % cfg.checkpoint_every_steps == 0 or done == total_steps:
        ckpt.save(done, _copy(state), pipeline.iterator_state(data), cfg, force=True)
        last_good = done
    final = evaluate(cfg, eval_step, state["params"], data_shardings)
    writer.write(total_steps, final, split="eval")
  finally:
    if profiling:
      jax.profiler.stop_trace()
    ckpt.close()
    writer.close()
  final = {"model": cfg.name, "steps": total_steps, "params": num_params,
           "d_model": cfg.model["d_model"], "seq_len": train_task.seq_len, **final}
  if jax.process_index() == 0:
    with open(final_path, "w", encoding="utf-8") as f:
      json.dump(final, f, indent=2)
  return final


def _copy(state: Any) -> Any:
  """New buffers for an asynchronous save: the next step donates (overwrites) the old ones."""
  return jax.tree.map(jnp.copy, state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Optional[Sequence[jax.Device]] = None
                       ) -> list[dict[str, Any]]:
  """Trains every row of ``config`` in turn and writes the results table; returns its rows.

  ``workdir`` may be relative; it is made absolute here (orbax requires absolute paths).
  The mesh (``config.mesh`` over ``devices``, default all) is built and checked against
  every selected row's model and batch size before the first row starts.
  """
  workdir = os.path.abspath(workdir)
  if not config.rows:
    raise ValueError("config.rows must list at least one model row")
  selected = list(config.rows)
  if config.get("only_rows"):
    wanted = [n.strip() for n in config.only_rows.split(",")]
    unknown = sorted(set(wanted) - {row["name"] for row in selected})
    if unknown:
      raise ValueError(f"config.only_rows names {unknown} not in the rows "
                       f"{[row['name'] for row in selected]}")
    selected = [row for row in selected if row["name"] in wanted]
  names = [row["name"] for row in selected]
  slugs = [slug(n) for n in names]
  if len(set(slugs)) != len(slugs):
    raise ValueError(f"config.rows names must differ after slugging, got {names}")
  mesh = mesh_from_config(config, devices)
  cfgs = [row_config(config, row) for row in selected]
  for cfg in cfgs:  # sizes that do not divide fail here, before any compilation
    try:
      _check_mesh(cfg, mesh, models.model_config(cfg.model),
                  _task(cfg, {}, cfg.data_seed).seq_len)
    except ValueError as e:
      raise ValueError(f"row {cfg.name!r}: {e}") from e
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for row, cfg, row_slug in zip(selected, cfgs, slugs):
    logging.info("=== %s (%s) ===", cfg.name, row_slug)
    result = train_row(cfg, os.path.join(workdir, row_slug), mesh)
    rows.append({**result, **dict(row.get("tags", {})), "paper": dict(row.get("paper", {}))})
  if jax.process_index() == 0:
    results_lib.write_results(config, rows, workdir)
  return rows
