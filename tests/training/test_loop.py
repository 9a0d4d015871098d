"""The training loop on the tiny test config: learning, evaluation, non-finite stop, resume.

These run ``experiments/configs/selective_copying.py:test`` (a 16-token copy task, d_model 16).
"""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments.configs import selective_copying
from mamba_jax.data.synthetic import make_task
from mamba_jax.training import loop, models
from mamba_jax.training.metrics import read_jsonl


def _config(**overrides):
  config = selective_copying.get_config("test")
  config.tensorboard = False
  config.update(overrides)
  return config


def _final_params(row_dir, step):
  """Raw arrays of the saved train state, restored without a target (plain nested dicts)."""
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(row_dir, "checkpoints", str(step), "state"))
  return restored["params"]


def _key(path):
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree):
  """{path: array}; the saved nnx.Param nodes end their paths with "value"."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key(path)[:-1] if _key(path)[-1] == "value" else _key(path): leaf
          for path, leaf in flat}


def test_loss_decreases_and_eval_matches_an_independent_count(tmp_path):
  config = _config(num_train_steps=60)
  rows = loop.train_and_evaluate(config, str(tmp_path))
  row_dir = tmp_path / "mamba_s6"
  train = [r for r in read_jsonl(row_dir / "metrics.jsonl") if r["split"] == "train"]
  assert train[-1]["loss"] < 0.9 * train[0]["loss"]
  assert all(np.isfinite(r["grad_norm"]) for r in train)

  # Recount the final accuracy in numpy from the saved params and the eval records.
  cfg = loop.row_config(config, config.rows[0])
  model = models.build_model(models.model_config(cfg.model), dtype_name="float32", seed=123)
  params = nnx.state(model, nnx.Param)
  saved = _flat(_final_params(row_dir, 60))
  params = jax.tree_util.tree_map_with_path(lambda path, _: saved[_key(path)],
                                            params.to_pure_dict())
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  fields = {k: v for k, v in cfg.task.to_dict().items() if k != "name"}
  task = make_task(cfg.task.name, seed=cfg.eval_seed, **fields)
  n = cfg.eval_batch_size * cfg.eval_batches
  records = [task[i] for i in range(n)]
  logits = np.asarray(model(np.stack([r["inputs"] for r in records])))[..., :6]
  correct = total = 0
  for rec, lg in zip(records, logits):
    m = rec["mask"]
    correct += int(np.sum(lg[m].argmax(-1) == rec["targets"][m]))
    total += int(m.sum())
  assert rows[0]["accuracy"] == pytest.approx(correct / total, abs=1e-9)
  results = json.load(open(tmp_path / "results.json"))
  assert results["rows"][0]["accuracy"] == rows[0]["accuracy"]
  assert (tmp_path / "results.md").read_text().count("Mamba + S6") == 1


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, monkeypatch):
  # A NaN learning rate from the 26th update on: that update is NaN, so step 26 is refused.
  config = _config(num_train_steps=40)
  real = loop.make_optimizer

  def poisoned(opt, total, mask):
    tx = real(opt, total, mask)
    return optax.chain(tx, optax.scale_by_schedule(
        lambda count: jnp.where(count >= 25, jnp.nan, 1.0)))

  monkeypatch.setattr(loop, "make_optimizer", poisoned)
  with pytest.raises(loop.NonFiniteError, match=r"step 26 .*last good checkpoint: step 20"):
    loop.train_and_evaluate(config, str(tmp_path))

  config = _config(num_train_steps=40, skip_nonfinite=True)
  rows = loop.train_and_evaluate(config, str(tmp_path / "skip"))
  train = [r for r in read_jsonl(tmp_path / "skip" / "mamba_s6" / "metrics.jsonl")
           if r["split"] == "train"]
  assert train[-1]["nonfinite_count"] > 0 and np.isfinite(rows[0]["loss"])
