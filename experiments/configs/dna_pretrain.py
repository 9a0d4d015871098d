"""DNA pretraining: Mamba (Gu & Dao, 2023), Figure 5 (right) in miniature — sequence length.

The task (Mamba §4.3.2; ``mamba_jax.data.dna.NextBasePretraining``): next-base prediction
(causal LM over the characters A, C, G, T, N) on human DNA. The paper pretrains on HG38
(the whole human genome, HyenaDNA's split) at lengths 2^10 … 2^20 with 2^20 tokens per batch,
a 6-layer, d_model 128 Mamba (≈ 1.4M parameters; HyenaDNA at the same size), and reports test
perplexity against the pretraining length. Here the corpus is the first 70 Mb of GRCh37 chrX
(Debian ``smalt-examples``), cut into 1 Mb regions (2 Mb in the default variant) of which 10 % are held out; every row
trains at its own length with a constant number of tokens per batch and is scored on the held
-out regions at that length. Install the data first: ``bash scripts/setup_data.sh``.

The paper's result (its figure gives no table): Mamba's perplexity falls steadily as the
pretraining length grows from 2^10 to 2^20, while HyenaDNA's gets worse with length. HyenaDNA is not built here; the rows are Mamba at each length.
Metrics: loss (nats per base), perplexity = exp(loss), bits per base; results.png: perplexity
against the training length.

Training recipe (our choice where the paper is silent): AdamW β 0.9/0.95, weight decay 0.1,
peak learning rate 8e-3 (2e-3 for the larger default), warmup then cosine decay.

Commands:
  python -m experiments.main --config=experiments/configs/dna_pretrain.py:tiny \
      --workdir=/tmp/dna_pretrain_tiny
  python -m experiments.main --config=experiments/configs/dna_pretrain.py:gpu \
      --workdir=/tmp/dna_pretrain_gpu

Variants:
  (default) the paper's model (6 layers, d_model 128) at 2^10 … 2^20 (2 Mb regions so a
            window of 2^20 fits), 2^20 tokens per batch, 20K steps. Not run here: GPU-days.
  gpu       the paper's model at 2^10, 2^13, 2^16 on the first 40 Mb, 2^16 tokens per
            batch, 300 steps per row. One H100: 388 s measured, sharing the GPU (experiments/README.md).
  tiny      2 layers, d_model 32 at 2^8, 2^10, 2^12 on the first 40 Mb, 4096 tokens per batch,
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
    raise ValueError(f"dna_pretrain variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.experiment = "DNA pretraining: perplexity against sequence length"
  config.reproduces = "Mamba (Gu & Dao, 2023), Figure 5 (right), in miniature"
  config.task = ml_collections.ConfigDict(dict(
      name="dna_next_base", length=1024, vocab_size=9, split="train", region_size=1 << 20,
      test_fraction=0.1))
  config.model = ml_collections.ConfigDict(dict(
      d_model=128, n_layer=6, vocab_size=9, pad_vocab_size_multiple=8, ssm_cfg={}))
  config.optimizer.update(dict(learning_rate=2e-3, warmup_steps=1000))
  config.num_train_steps = 20_000
  config.log_every_steps = 200
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.results.columns = ["perplexity", "bits_per_base", "accuracy", "params"]
  config.results.metric = "perplexity"
  config.results.plot = "metric_vs_seq_len"
  config.results.group_by = "arch"
  lengths, tokens, eval_tokens = [2**k for k in range(10, 21)], 1 << 20, 1 << 21
  config.task.region_size = 1 << 21

  if variant == "gpu":
    config.task.region_size = 1 << 20
    config.task.max_bases = 40_000_000  # its cache (10 MB) travels to a GPU machine
    lengths, tokens, eval_tokens = [2**k for k in (10, 13, 16)], 1 << 16, 1 << 20
    config.optimizer.update(dict(learning_rate=8e-3, warmup_steps=40))
    config.num_train_steps = 300
    config.log_every_steps = 50
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 300
    config.tensorboard = False
  elif variant == "tiny":
    config.task.update(dict(region_size=1 << 20, max_bases=40_000_000))  # the gpu's data
    config.model.update(dict(d_model=32, n_layer=2))
    lengths, tokens, eval_tokens = [2**k for k in (8, 10, 12)], 4096, 1 << 15
    config.optimizer.update(dict(learning_rate=8e-3, warmup_steps=15))
    config.num_train_steps = 100
    config.log_every_steps = 25
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 100
    config.tensorboard = False
  config.rows = length_rows("Mamba", MAMBA, lengths, tokens_per_batch=tokens,
                            eval_tokens=eval_tokens)
  return config
