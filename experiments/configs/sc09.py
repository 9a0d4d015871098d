"""Spoken digits: Mamba (Gu & Dao, 2023), Table 4 in miniature — NLL of one-second waveforms.

The task (Mamba §4.4.2; ``mamba_jax.data.audio.SpokenDigits``): autoregressive modelling of
whole one-second clips of the words "zero" … "nine", 16 kHz, 8-bit μ-law, every sample scored
(a <bos> token starts each clip). SC09 (Speech Commands) itself is not available offline; the
stand-in is synthesized by espeak-ng (7 English accents × 12 voice variants, each with its
own pitch and speed, jittered per clip) and, in the default variant, flite's 4 voices, cached
on disk (``mamba_jax.data.audio_synth``). As SC09 holds out speakers, 10 % of the voices are
the test split. Install first: ``bash scripts/setup_data.sh``.

The paper's Table 4 (SC09, autoregressive models, NLL in bits per sample): SampleRNN 2.042,
WaveNet 1.992, SaShiMi 1.873, Mamba (6.1M) 1.852 — each with FID / IS / mIS / AM computed by
an SC09 digit classifier on generated clips. The numbers measured here are on synthetic
speech, far more regular than SC09's 2,600 real speakers, so they are expected to be much
lower and are not comparable; the paper's value is shown only as a reference. The automated
metrics are not computed: they need an SC09-trained classifier (not available offline) and
thousands of generated clips; a classifier trained on the synthetic digits could stand in, but
it is not built.

The paper's model is SaShiMi's U-Net with Mamba blocks; here a flat Mamba stack.

Commands:
  python -m experiments.main --config=experiments/configs/sc09.py:tiny --workdir=/tmp/sc09_tiny
  python -m experiments.main --config=experiments/configs/sc09.py:gpu --workdir=/tmp/sc09_gpu

Variants:
  (default) 8 layers, d_model 128, 5000 clips (espeak-ng and flite), 16,000 samples per clip,
            batch 16, 20K steps. Not run here.
  gpu       4 layers, d_model 64, 2000 espeak-ng clips, batch 8 × 16,000, 300 steps; one H100,
            113 s measured, sharing the GPU (experiments/README.md).
  tiny      2 layers, d_model 32, 400 clips at 8 kHz (8000 samples each), batch 2, 100 steps;
            CPU (measured: experiments/README.md).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import base_config

VARIANTS = ("", "gpu", "tiny")
PAPER_BITS = 1.852  # Mamba (6.1M), SC09, Table 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"sc09 variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.experiment = "Spoken digits (synthesized SC09 stand-in): NLL of one-second clips"
  config.reproduces = "Mamba (Gu & Dao, 2023), Table 4 (NLL column), in miniature"
  config.task = ml_collections.ConfigDict(dict(
      name="spoken_digits", length=16_000, vocab_size=257, split="train", num_clips=5000,
      sample_rate=16_000, engines=("espeak-ng", "flite"), test_fraction=0.1))
  config.eval_tasks = {"": {"split": "test"}}
  config.model = ml_collections.ConfigDict(dict(
      d_model=128, n_layer=8, vocab_size=257, pad_vocab_size_multiple=8,
      ssm_cfg={"layer": "Mamba1", "d_state": 16}))
  config.rows = [{"name": "Mamba", "paper": {"bits_per_sample": PAPER_BITS}}]
  config.optimizer.update(dict(learning_rate=2e-3, warmup_steps=1000))
  config.batch_size = 16
  config.num_train_steps = 20_000
  config.eval_batch_size = 16
  config.eval_batches = 16
  config.log_every_steps = 200
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.results.columns = ["bits_per_sample", "loss", "accuracy", "params"]

  if variant == "gpu":
    config.task.update(dict(num_clips=2000, engines=("espeak-ng",)))
    config.model.update(dict(d_model=64, n_layer=4))
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=30))
    config.batch_size = 8
    config.num_train_steps = 300
    config.eval_batch_size = 8
    config.eval_batches = 16
    config.log_every_steps = 50
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 300
    config.tensorboard = False
  elif variant == "tiny":
    config.task.update(dict(num_clips=400, sample_rate=8000, length=8000,
                            engines=("espeak-ng",)))
    config.model.update(dict(d_model=32, n_layer=2))
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=10))
    config.batch_size = 2
    config.num_train_steps = 100
    config.eval_batch_size = 4
    config.eval_batches = 8
    config.log_every_steps = 25
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 100
    config.tensorboard = False
  return config
