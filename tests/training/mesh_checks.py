"""The experiment loop on device meshes, run in a subprocess with 8 host CPU devices.

``python -m tests.training.mesh_checks <case> <tmpdir>`` trains the tiny selective-copying
config (``selective_copying.py:test`` with one layer, 6 steps of batch 8, length 16) with
``loop.train_and_evaluate`` on one device and on meshes of 4 or 8 of the devices, and prints
one JSON object: relative errors (‖sharded − one device‖ / ‖one device‖ per array, the
largest) of the final parameters and optimizer state read back from the checkpoints, and
what else the pytest module (test_loop_mesh.py) asserts on. Cases:

  mamba1    the Mamba-1 row: the one-device run's step-3 checkpoint resumed on data=2 ×
            tensor=2 to step 6.
  mamba2    a Mamba-2 row (4 heads of 8, 2 groups, chunk 4): fsdp=2 × tensor=2 × sequence=2
            from scratch; and meshes the model, the batch or an evaluation length cannot
            take, which must fail before anything is written or compiled.
  mamba1_sharded_resume  (slow) the Mamba-1 row on data=2 × tensor=2 from scratch; its
            step-3 checkpoint (sharded arrays) resumed on fsdp=2 × tensor=2.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments.configs import selective_copying
from mamba_jax.training import loop
from mamba_jax.training.metrics import read_jsonl

STEPS = 6
MAMBA2_ROW = {"name": "Mamba-2", "model": {"ssm_cfg": {
    "layer": "Mamba2", "headdim": 8, "ngroups": 2, "chunk_size": 4}}}


class _Messages(std_logging.Handler):
  """Keeps the absl log lines (the loop logs the mesh and per-device bytes)."""

  def __init__(self):
    super().__init__()
    self.lines: list[str] = []

  def emit(self, record):
    self.lines.append(record.getMessage())


MESSAGES = _Messages()
std_logging.getLogger("absl").addHandler(MESSAGES)
std_logging.getLogger("absl").setLevel(std_logging.INFO)


def config(mesh: dict[str, int], mamba2: bool = False, **fields: Any):
  """The tiny test config on ``mesh`` (other sizes: the defaults), fields overridden."""
  cfg = selective_copying.get_config("test")
  cfg.tensorboard = False
  cfg.num_train_steps = STEPS
  cfg.checkpoint_every_steps = 3
  cfg.eval_every_steps = 1000
  cfg.log_every_steps = 1
  cfg.optimizer.warmup_steps = 2
  cfg.mesh.update(mesh)
  cfg.model.n_layer = 1  # compilation is most of the time: one layer halves it
  if mamba2:
    cfg.rows = [MAMBA2_ROW]
  cfg.update(fields)
  return cfg


def train(cfg, workdir: str, devices: int) -> list[dict[str, Any]]:
  return loop.train_and_evaluate(cfg, workdir, devices=jax.devices()[:devices])


def _row(workdir: str) -> str:
  (name,) = [d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))]
  return os.path.join(workdir, name)


def saved_state(workdir: str, step: int = STEPS) -> dict[str, Any]:
  """The checkpointed train state of ``step`` as numpy arrays ({path: array})."""
  state = ocp.StandardCheckpointer().restore(
      os.path.join(_row(workdir), "checkpoints", str(step), "state"))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def rel_errors(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
  """Largest relative error over the arrays of params and of opt_state; b the reference."""
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  out = {"params": 0.0, "opt_state": 0.0}
  for key, ref in b.items():
    part = "params" if key.startswith("['params']") else "opt_state"
    if ref.ndim == 0:  # step counters: must be equal
      assert a[key] == ref, (key, a[key], ref)
      continue
    ref64, got64 = ref.astype(np.float64), a[key].astype(np.float64)
    denom = np.linalg.norm(ref64) or 1.0
    out[part] = max(out[part], float(np.linalg.norm(got64 - ref64) / denom))
  return out


def per_device_bytes() -> list[tuple[int, int]]:
  """(per-device, total) parameter bytes of each row started so far, from the loop's log."""
  pattern = re.compile(r"per device: parameters (\d+) of (\d+) bytes")
  return [(int(m.group(1)), int(m.group(2)))
          for m in map(pattern.search, MESSAGES.lines) if m]


def _resume(source: str, workdir: str, step: int, cfg, devices: int) -> list[dict[str, Any]]:
  """Continues ``source``'s run from its ``step`` checkpoint in ``workdir``, on cfg.mesh."""
  shutil.copytree(source, workdir)
  row = _row(workdir)
  for name in ("final_eval.json", "metrics.jsonl"):
    os.remove(os.path.join(row, name))
  for saved in os.listdir(os.path.join(row, "checkpoints")):
    if saved.isdigit() and int(saved) > step:
      shutil.rmtree(os.path.join(row, "checkpoints", saved))
  return train(cfg, workdir, devices)


def _train_steps(workdir: str) -> list[int]:
  return [r["step"] for r in read_jsonl(os.path.join(_row(workdir), "metrics.jsonl"))
          if r["split"] == "train"]


def case_mamba1(tmp: str) -> dict[str, Any]:
  """One device for 6 steps; its step-3 checkpoint resumed on data=2 × tensor=2."""
  ref, resumed = os.path.join(tmp, "ref"), os.path.join(tmp, "resumed")
  ref_rows = train(config({}), ref, 1)
  resumed_rows = _resume(ref, resumed, 3, config({"data": 2, "tensor": 2}), 4)
  return {"resumed_dp2_tp2": rel_errors(saved_state(resumed), saved_state(ref)),
          "resumed_train_steps": _train_steps(resumed),
          "accuracy": [ref_rows[0]["accuracy"], resumed_rows[0]["accuracy"]],
          "per_device_bytes": per_device_bytes()}


def case_mamba1_sharded_resume(tmp: str) -> dict[str, Any]:
  """One device; data=2 × tensor=2 from scratch; its step-3 checkpoint (sharded arrays)
  resumed on fsdp=2 × tensor=2."""
  ref, dp_tp, resumed = (os.path.join(tmp, n) for n in ("ref", "dp_tp", "resumed"))
  train(config({}), ref, 1)
  train(config({"data": 2, "tensor": 2}), dp_tp, 4)
  _resume(dp_tp, resumed, 3, config({"fsdp": 2, "tensor": 2, "data": 1}), 4)
  return {"dp2_tp2": rel_errors(saved_state(dp_tp), saved_state(ref)),
          "resumed_fsdp2_tp2": rel_errors(saved_state(resumed), saved_state(ref)),
          "resumed_vs_dp2_tp2": rel_errors(saved_state(resumed), saved_state(dp_tp)),
          "resumed_train_steps": _train_steps(resumed),
          "per_device_bytes": per_device_bytes()}


def _error(cfg, workdir: str) -> str:
  """The ValueError message of a run that must fail at start; checks nothing was written."""
  try:
    train(cfg, workdir, 4)
  except ValueError as e:
    assert not os.path.exists(workdir), os.listdir(workdir)
    return str(e)
  raise AssertionError(f"mesh {cfg.mesh} did not fail")


def case_mamba2(tmp: str) -> dict[str, Any]:
  out: dict[str, Any] = {}
  out["errors"] = {
      "tensor=3": _error(config({"tensor": 3}, True), os.path.join(tmp, "t3")),
      "tensor=4": _error(config({"tensor": 4}, True), os.path.join(tmp, "t4")),
      "batch": _error(config({"data": 4}, batch_size=6), os.path.join(tmp, "b6")),
      "eval_length": _error(config({"sequence": 4, "data": 1}, True,
                                   eval_tasks={"long": {"length": 9}}),
                            os.path.join(tmp, "l")),
  }
  ref, sharded = os.path.join(tmp, "ref"), os.path.join(tmp, "sharded")
  train(config({}, True), ref, 1)
  train(config({"fsdp": 2, "tensor": 2, "sequence": 2, "data": 1}, True), sharded, 8)
  out["fsdp2_tp2_sp2"] = rel_errors(saved_state(sharded), saved_state(ref))
  out["per_device_bytes"] = per_device_bytes()
  return out


def main() -> None:
  case, tmp = sys.argv[1], sys.argv[2]
  result = {"mamba1": case_mamba1, "mamba1_sharded_resume": case_mamba1_sharded_resume,
            "mamba2": case_mamba2}[case](tmp)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
