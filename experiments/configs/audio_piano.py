"""Piano waveform modelling: Mamba (Gu & Dao, 2023), Figure 7 in miniature — context length.

The task (Mamba §4.4.1; ``mamba_jax.data.audio.PianoWaveform``): autoregressive prediction of
8-bit μ-law samples at 16 kHz. The paper trains on YouTubeMix (4 hours of solo piano) at
context lengths 2^13 … 2^20 (≈ 0.5 s to 1 minute) and reports bits per byte (= NLL / ln 2
per sample) on the test split: both Mamba and SaShiMi (S4 + MLP) improve steadily with longer
context, Mamba is better throughout, and the gap widens with length. The paper's models are
SaShiMi's U-Net (pooling stages) with Mamba blocks and complex-valued SSMs; here the model
is a flat Mamba stack (real-valued, ``s4d_real`` init), and SaShiMi is not built.

Data: Bach chorales (then other scores) bundled with music21, rendered on General MIDI piano
(the SoundFont in the pretty_midi wheel) by tinysoundfont at 16 kHz, one minute each at most,
cached on disk (``mamba_jax.data.audio_synth``); whole pieces are held out for test (10 %).
Install first: ``bash scripts/setup_data.sh``. Metric: bits per sample on the test pieces,
each row at its own training length; results.png: bits against the context length.

Commands:
  python -m experiments.main --config=experiments/configs/audio_piano.py:tiny \
      --workdir=/tmp/audio_piano_tiny
  python -m experiments.main --config=experiments/configs/audio_piano.py:gpu \
      --workdir=/tmp/audio_piano_gpu

Variants:
  (default) 8 layers, d_model 64, 200 pieces, lengths 2^13 … 2^19, 2^19 samples per batch,
            20K steps. Not run here.
  gpu       the default model, 32 pieces, lengths 2^11, 2^13, 2^15, 2^16 samples per batch,
            300 steps per row; one H100: 262 s measured, sharing the GPU (experiments/README.md).
  tiny      2 layers, d_model 32, 16 pieces, lengths 2^8, 2^10, 2^12, 4096 samples per batch,
            100 steps per row; CPU (measured: experiments/README.md).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import base_config
from experiments.configs.length_sweep import length_rows

VARIANTS = ("", "gpu", "tiny")
MAMBA = {"ssm_cfg": {"layer": "Mamba1", "d_state": 16}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"audio_piano variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.experiment = "Piano waveforms: bits per sample against context length"
  config.reproduces = "Mamba (Gu & Dao, 2023), Figure 7, in miniature"
  config.task = ml_collections.ConfigDict(dict(
      name="piano", length=8192, vocab_size=256, split="train", num_pieces=200,
      sample_rate=16_000, max_seconds=60.0, test_fraction=0.1))
  config.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layer=8, vocab_size=256, pad_vocab_size_multiple=8, ssm_cfg={}))
  config.optimizer.update(dict(learning_rate=2e-3, warmup_steps=1000))
  config.num_train_steps = 20_000
  config.log_every_steps = 200
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.results.columns = ["bits_per_sample", "loss", "accuracy", "params"]
  config.results.metric = "bits_per_sample"
  config.results.plot = "metric_vs_seq_len"
  config.results.group_by = "arch"
  lengths, tokens, eval_tokens = [2**k for k in range(13, 20)], 1 << 19, 1 << 21

  if variant == "gpu":
    config.task.num_pieces = 32
    lengths, tokens, eval_tokens = [2**k for k in (11, 13, 15)], 1 << 16, 1 << 20
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=30))
    config.num_train_steps = 300
    config.log_every_steps = 50
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 300
    config.tensorboard = False
  elif variant == "tiny":
    config.task.num_pieces = 16
    config.model.update(dict(d_model=32, n_layer=2))
    lengths, tokens, eval_tokens = [2**k for k in (8, 10, 12)], 4096, 1 << 15
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=15))
    config.num_train_steps = 100
    config.log_every_steps = 25
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 100
    config.tensorboard = False
  config.rows = length_rows("Mamba", MAMBA, lengths, tokens_per_batch=tokens,
                            eval_tokens=eval_tokens)
  return config
