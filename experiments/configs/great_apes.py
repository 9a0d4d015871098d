"""Great Apes DNA classification: Mamba (Gu & Dao, 2023), Figure 6 in miniature.

The task (Mamba §4.3.4; ``mamba_jax.data.dna.GreatApesClassification``): given a random
window of l bases of one species' DNA, say which species it is. The paper's five species
(human, chimpanzee, gorilla, orangutan, bonobo) share about 99 % of their DNA; it fine-tunes
models pretrained on HG38 at lengths 2^10 … 2^20 and reports accuracy against the length.
Here: four species (no offline source has bonobo; chance is 25 %, not 20 %), chr22 of the
Ensembl EPO alignment (Debian ``maffilter-examples``; each species ≈ 21.6 Mb; divergence from
human: chimp 1.26 %, gorilla 1.62 %, orangutan 3.5 %), split by alignment block into 1 Mb
regions with 10 % held out for test, the same blocks for every species. Install the data
first: ``bash scripts/setup_data.sh``.

Model: a Mamba backbone, mean-pooled final hidden states and a linear head
(``mamba_jax.nn.classifier.SequenceClassifier``), trained from scratch at each length
(the paper fine-tunes its pretrained models; loading a ``dna_pretrain.py`` checkpoint into
``classifier.lm`` is not wired into the loop). Metric: test accuracy.

The paper's result (its figure gives no table): Mamba's accuracy rises with length and stays
above HyenaDNA's at every length; short windows are near chance.

Commands:
  python -m experiments.main --config=experiments/configs/great_apes.py:tiny \
      --workdir=/tmp/great_apes_tiny
  python -m experiments.main --config=experiments/configs/great_apes.py:gpu \
      --workdir=/tmp/great_apes_gpu

Variants:
  (default) 6 layers, d_model 128 (the paper's 1.4M-parameter size) at 2^10 … 2^19 (a 1 Mb
            region holds no window of 2^20 bases of every species; raise region_size and the
            test split shrinks to 1 region), 2^18 tokens per batch, 10K steps. Not run here.
  gpu       the same model at 2^10, 2^13, 2^16 on the first half of the alignment (2 of
            12 regions held out); 2^16 tokens per batch, 300 steps per row; one H100:
            399 s measured, sharing the GPU (experiments/README.md).
  tiny      2 layers, d_model 32 at 2^8, 2^10, 2^12 on the gpu variant's half of the alignment;
            4096 tokens per batch, 100 steps per row; 128 test windows per length; CPU
            (measured: experiments/README.md).
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
    raise ValueError(f"great_apes variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.experiment = "Great Apes DNA classification: accuracy against sequence length"
  config.reproduces = "Mamba (Gu & Dao, 2023), Figure 6, in miniature (4 species, not 5)"
  config.task = ml_collections.ConfigDict(dict(
      name="great_apes", length=1024, vocab_size=9, num_classes=4, split="train",
      region_size=1 << 20, test_fraction=0.1))
  config.classifier = ml_collections.ConfigDict(dict(num_classes=4, pooling="mean"))
  config.model = ml_collections.ConfigDict(dict(
      d_model=128, n_layer=6, vocab_size=9, pad_vocab_size_multiple=8, ssm_cfg={}))
  config.optimizer.update(dict(learning_rate=2e-3, warmup_steps=500))
  config.num_train_steps = 10_000
  config.log_every_steps = 200
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 2_000
  config.results.columns = ["accuracy", "loss", "params"]
  config.results.metric = "accuracy"
  config.results.plot = "metric_vs_seq_len"
  config.results.group_by = "arch"
  lengths, tokens, eval_sequences = [2**k for k in range(10, 20)], 1 << 18, 512

  if variant == "gpu":
    # The first 4800 blocks (≈ 10.8 Mb per species; its cache, 12 MB, travels to a GPU).
    config.task.update(dict(max_blocks=4800, test_fraction=0.2))
    lengths, tokens, eval_sequences = [2**k for k in (10, 13, 16)], 1 << 16, 512
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=30))
    config.num_train_steps = 300
    config.log_every_steps = 50
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 300
    config.tensorboard = False
  elif variant == "tiny":
    config.task.update(dict(max_blocks=4800, test_fraction=0.2))  # the gpu variant's data
    config.model.update(dict(d_model=32, n_layer=2))
    lengths, tokens, eval_sequences = [2**k for k in (8, 10, 12)], 4096, 128
    config.optimizer.update(dict(learning_rate=4e-3, warmup_steps=15))
    config.num_train_steps = 100
    config.log_every_steps = 25
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 100
    config.tensorboard = False
  config.rows = length_rows("Mamba", MAMBA, lengths, tokens_per_batch=tokens,
                            eval_sequences=eval_sequences)
  return config
