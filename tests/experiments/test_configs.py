"""Every experiment config variant parses, and every row gives a valid model and task."""

import importlib

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from mamba_jax.data.synthetic import make_task
from mamba_jax.training import loop, models

CONFIGS = {
    "selective_copying": ("", "tiny", "test", "gpu_short"),
    "induction_heads": ("", "tiny"),
    "mqar": ("", "tiny", "gpu_short"),
}
CASES = [(name, v) for name, variants in CONFIGS.items() for v in variants]


def _module(name):
  return importlib.import_module(f"experiments.configs.{name}")


@pytest.mark.parametrize("name,variant", CASES)
def test_rows_build_valid_models_and_tasks(name, variant):
  config = _module(name).get_config(variant)
  assert config.experiment and config.reproduces and config.rows
  for row in config.rows:
    cfg = loop.row_config(config, row)
    model_config = models.model_config(cfg.model)
    assert model_config.vocab_size == cfg.task.vocab_size
    fields = {k: v for k, v in cfg.task.to_dict().items() if k != "name"}
    task = make_task(cfg.task.name, seed=0, **fields)
    assert task[0]["inputs"].max() < cfg.task.vocab_size
    for overrides in cfg.eval_tasks.values():
      fields_eval = {k: v for k, v in {**fields, **overrides}.items()
                     if k not in ("batch_size", "num_batches")}
      make_task(cfg.task.name, seed=0, **fields_eval)


def test_selective_copying_rows_are_the_papers():
  config = _module("selective_copying").get_config()
  got = {r["name"]: (r["model"]["ssm_cfg"]["layer"], r["model"]["ssm_cfg"]["ssm_kind"],
                     r["paper"]["accuracy"]) for r in config.rows}
  assert got == {"S4 (no gate)": ("SSMNoGate", "s4d", 0.183),
                 "S6 (no gate)": ("SSMNoGate", "s6", 0.970),
                 "H3 + S4": ("H3", "s4d", 0.570), "H3 + S6": ("H3", "s6", 0.997),
                 "Mamba + S4": ("Mamba1", "s4d", 0.564), "Mamba + S6": ("Mamba1", "s6", 0.998)}
  assert config.task.length == 4096 and config.task.num_tokens == 16
  assert config.task.vocab_size == 16


@pytest.mark.parametrize("name", ["induction_heads", "mqar"])
def test_tiny_rows_construct_and_run(name):
  config = _module(name).get_config("tiny")
  for row in config.rows:
    cfg = loop.row_config(config, row)
    model = models.build_model(models.model_config(cfg.model), dtype_name="float32", seed=0)
    ids = jnp.zeros((1, 8), jnp.int32)
    logits = model(ids)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
    assert models.weight_decay_mask(model) is not None
    del model


def test_config_flag_variant(tmp_path):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  path = "experiments/configs/selective_copying.py"
  fv([__file__, f"--config={path}:tiny"])
  assert fv.config.num_train_steps == 1000 and fv.config.task.length == 32
  with pytest.raises(ValueError, match="variant"):
    _module("mqar").get_config("huge")


def test_row_overrides_merge_model_fields():
  config = _module("induction_heads").get_config("tiny")
  cfg = loop.row_config(config, config.rows[0])
  assert cfg.model["ssm_cfg"]["d_state"] == 16 and cfg.model["attn_layer_idx"] == (0, 1)
  with pytest.raises(ValueError, match="unknown keys"):
    loop.row_config(config, {"name": "x", "modle": {}})


def test_induction_heads_xpos_row_trains_two_steps(tmp_path):
  config = _module("induction_heads").get_config("tiny")
  row = next(r for r in config.rows if r["name"] == "MHA-xPos")
  assert row["model"]["attn_cfg"]["positions"] == "xpos"
  config.only_rows = "MHA-xPos"
  config.eval_tasks = {"64": {"length": 64}}
  config.results.columns = ["accuracy@64"]
  config.update(dict(batch_size=4, num_train_steps=2, eval_batch_size=4, eval_batches=1,
                     log_every_steps=1, checkpoint_every_steps=2, async_checkpoint=False,
                     tensorboard=False))
  rows = loop.train_and_evaluate(config, str(tmp_path))
  assert [r["model"] for r in rows] == ["MHA-xPos"]
  assert 0.0 <= rows[0]["accuracy@64"] <= 1.0
