"""The DNA and audio experiment configs: every variant's rows are valid; each tiny variant's
data gives batches the model accepts, and trains two steps end to end on a small slice of its
data (one row, short sequences). The two-step runs cost 10-40 s each, mostly compilation: the
classifier (great_apes) and spoken-digit runs are in the fast suite; the other two LM runs,
the same code path as spoken digits, are marked slow."""

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from mamba_jax.data import dna, pipeline, tasks
from mamba_jax.training import loop, models

CONFIGS = ("dna_pretrain", "great_apes", "audio_piano", "sc09")
HAVE = {
    "dna_pretrain": os.path.isfile(dna.HUMAN_CHRX),
    "great_apes": os.path.isfile(dna.GREAT_APES_MAF),
    "audio_piano": all(importlib.util.find_spec(p) for p in ("music21", "tinysoundfont",
                                                            "pretty_midi")),
    "sc09": bool(shutil.which("espeak-ng") and shutil.which("sox")),
}
# Small data for the two-step runs: a prefix of chrX / of the alignment, three short pieces,
# twenty clips at 8 kHz.
SMALL_DATA = {
    "dna_pretrain": {"max_bases": 3_000_000, "region_size": 1 << 18, "length": 64},
    "great_apes": {"max_blocks": 400, "region_size": 1 << 18, "length": 64},
    "audio_piano": {"num_pieces": 3, "max_seconds": 3.0, "test_fraction": 0.34,
                    "length": 64},
    "sc09": {"num_clips": 20, "sample_rate": 8000, "length": 512, "test_fraction": 0.2},
}


def _module(name):
  return importlib.import_module(f"experiments.configs.{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_variant_has_valid_rows(name):
  module = _module(name)
  for variant in module.VARIANTS:
    config = module.get_config(variant)
    assert config.experiment and config.reproduces and config.rows
    constructor = tasks.find_task(config.task.name)
    fields = {f.name for f in dataclasses.fields(constructor)}
    for row in config.rows:
      cfg = loop.row_config(config, row)
      assert models.model_config(cfg.model).vocab_size == cfg.task.vocab_size
      assert set(cfg.task) - {"name"} <= fields
      for overrides in cfg.eval_tasks.values():
        assert set(overrides) - {"batch_size", "num_batches"} <= fields
  with pytest.raises(ValueError, match="variant"):
    module.get_config("huge")


def _skip_without_data(name):
  if not HAVE[name]:
    pytest.skip(f"{name}'s data sources are not installed: run `bash scripts/setup_data.sh`")


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_variant_batches(name, tmp_path, monkeypatch):
  _skip_without_data(name)
  monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path / "cache"))
  config = _module(name).get_config("tiny")
  fields = {**config.task.to_dict(), **SMALL_DATA[name]}
  task = tasks.make_task(fields.pop("name"), seed=0, **fields)
  batch = next(pipeline.train_iterator(task, 4, num_threads=0, process_index=0,
                                       process_count=1))
  assert batch["inputs"].shape == (4, fields["length"])
  assert batch["inputs"].min() >= 0 and batch["inputs"].max() < config.model.vocab_size
  out_size = models.output_size(config)
  assert batch["targets"].max() < out_size and batch["mask"].any()
  assert np.issubdtype(batch["inputs"].dtype, np.integer)


TWO_STEP_CASES = [pytest.param("dna_pretrain", marks=pytest.mark.slow), "great_apes",
                  pytest.param("audio_piano", marks=pytest.mark.slow), "sc09"]


@pytest.mark.parametrize("name", TWO_STEP_CASES)
def test_tiny_variant_trains_two_steps(name, tmp_path, monkeypatch):
  _skip_without_data(name)
  monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path / "cache"))
  config = _module(name).get_config("tiny")
  config.rows = config.rows[:1]
  row = config.rows[0]
  row.pop("batch_size", None)
  row.pop("eval_tasks", None)
  row.pop("task", None)
  config.task.update(SMALL_DATA[name])
  config.eval_tasks = {"": {"split": "test"}}
  config.model.update(dict(d_model=16, n_layer=1))
  config.update(dict(batch_size=2, num_train_steps=2, eval_batch_size=2, eval_batches=1,
                     log_every_steps=1, checkpoint_every_steps=2, async_checkpoint=False,
                     tensorboard=False))
  rows = loop.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["rows"][0]["model"] == row["name"]
  result = rows[0]
  metric = {"dna_pretrain": "perplexity", "great_apes": "accuracy",
            "audio_piano": "bits_per_sample", "sc09": "bits_per_sample"}[name]
  assert result[metric] is not None and result[metric] >= 0
  if name == "great_apes":
    assert 0.0 <= result["accuracy"] <= 1.0
  else:  # an untrained model: about log2(vocabulary) bits (nats for perplexity's log)
    assert result["loss"] > 1.0
