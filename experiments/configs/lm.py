"""Language modelling on the offline text corpora: Mamba-1, Mamba-2, Transformer++ and a hybrid.

Reproduces in miniature Mamba (Gu & Dao, 2023) §4.2.1 / Figure 4 (scaling laws: perplexity
against size, Mamba matching Transformer++) and Mamba-2 (Dao & Gu, 2024) Figure 9 (with the
hybrid of §9.2.3). The paper trains on the Pile with the GPT-NeoX tokenizer from 125M to 1.3B
parameters; here the data is ``mamba_jax.data.text`` (Shakespeare by default, or the enwik
XML excerpt with ``--config.task.source=enwik``), split by whole documents (10 % held out),
and the tokenizer is bytes (default) or GPT-NeoX-20B (the ``neox*`` variants). Install the data
first: ``bash scripts/setup_data.sh``.

Rows at matched size (the papers' convention): a Transformer++ layer (attention + SwiGLU MLP,
≈ 12·d² parameters) counts as two Mamba layers (≈ 6·d² each), so the SSM models have twice
the layers. Transformer++: RoPE on the full head dimension, SwiGLU MLP of width 8/3·d (rounded
up to a multiple of 16), RMSNorm, no biases. Hybrid: Mamba-2 layers with attention at the
middle layer (Mamba-2 §9.2.3 puts ≈ 10 % attention layers; one of 2L here).

Metrics on the validation split: loss (nats per token), perplexity = exp(loss), bits per
byte = loss / ln 2 · tokens / bytes (per byte for the byte tokenizer up to end-of-text ids),
next-token accuracy. The paper's numbers (Pile perplexity at ≥ 125M parameters) are not
comparable at this scale: the table has no paper column; the scaling variant draws
bits_per_byte against parameters (results.png).

Training recipe: the papers' optimizer (``mamba_jax.training.optimizer``: AdamW β 0.9/0.95,
weight decay 0.1, clipping 1.0, warmup then cosine decay to 1e-5) at peak learning rate 2e-3
(3e-3 for tiny), our choice for these small models.

Commands:
  python -m experiments.main --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm_tiny
  python -m experiments.main --config=experiments/configs/lm.py --workdir=/tmp/lm
  python -m experiments.main --config=experiments/configs/lm.py:scaling --workdir=/tmp/lm_scaling

Variants:
  (default)      byte-level Shakespeare, d_model 128 (2L = 8 SSM layers, 4 Transformer++
                 layers), length 256, batch 32, 2000 steps. GPU.
  tiny           d_model 32 (4 / 2 layers), length 64, batch 16, 150 steps; the 4 rows build
                 and train on CPU in about a minute each on 2 cores (measured numbers in
                 experiments/README.md).
  neox           GPT-NeoX-20B tokens (vocabulary 50,280), otherwise the default. GPU.
  neox_tiny      the tiny models on NeoX tokens (the embedding dominates the parameters).
  scaling        Figure 4 in miniature: Mamba-1, Mamba-2 and Transformer++ at d_model 64 / 128 /
                 192 / 256, byte-level, 2000 steps each; results.png: bits per byte against
                 parameters. GPU.
  scaling_tiny   Mamba-1 and Transformer++ at d_model 16 / 32 / 48, 150 steps each (CPU).
"""

from __future__ import annotations

import math

import ml_collections

from experiments.configs.common import base_config

VARIANTS = ("", "tiny", "neox", "neox_tiny", "scaling", "scaling_tiny")
MODELS = ("Mamba-1", "Mamba-2", "Transformer++", "Hybrid")
VOCAB = {"byte": 256, "neox": 50280}


def mlp_width(d_model: int) -> int:
  """SwiGLU width 8/3·d rounded up to a multiple of 16 (keeps a 4·d GELU MLP's parameters)."""
  return int(math.ceil(8 * d_model / 3 / 16) * 16)


def model_fields(name: str, d_model: int, n_layer: int, *, headdim: int) -> dict:
  """MambaConfig fields of one row; ``n_layer`` counts Transformer++ layers (SSMs get 2×)."""
  heads = max(1, d_model // 32)
  attn_cfg = {"num_heads": heads, "rotary_emb_dim": d_model // heads, "qkv_proj_bias": False,
              "out_proj_bias": False, "causal": True}
  mamba2 = {"layer": "Mamba2", "d_state": 64, "headdim": headdim, "chunk_size": 64}
  if name == "Mamba-1":
    return {"d_model": d_model, "n_layer": 2 * n_layer, "d_intermediate": 0,
            "ssm_cfg": {"layer": "Mamba1", "d_state": 16}}
  if name == "Mamba-2":
    return {"d_model": d_model, "n_layer": 2 * n_layer, "d_intermediate": 0, "ssm_cfg": mamba2}
  if name == "Transformer++":
    return {"d_model": d_model, "n_layer": n_layer, "d_intermediate": mlp_width(d_model),
            "attn_layer_idx": tuple(range(n_layer)), "attn_cfg": attn_cfg}
  if name == "Hybrid":
    return {"d_model": d_model, "n_layer": 2 * n_layer, "d_intermediate": 0, "ssm_cfg": mamba2,
            "attn_layer_idx": (n_layer,), "attn_cfg": attn_cfg}
  raise ValueError(f"lm model must be one of {MODELS}, got {name!r}")


def _rows(models, widths, n_layer: int, headdim: int, tag_width: bool = False):
  rows = []
  for width in widths:
    for name in models:
      rows.append({"name": f"{name} d={width}" if tag_width else name,
                   "model": model_fields(name, width, n_layer, headdim=headdim),
                   "tags": {"group": name}})
  return rows


def text_lm_config(*, tokenizer: str = "byte", source: str = "shakespeare",
                   length: int = 256) -> ml_collections.ConfigDict:
  """The shared text-LM fields (also used by ``ablations.py``)."""
  config = base_config()
  vocab = VOCAB[tokenizer]
  config.task = ml_collections.ConfigDict(dict(
      name="text_lm", source=source, tokenizer=tokenizer, vocab_size=vocab, length=length,
      split="train", val_fraction=0.1))
  config.eval_tasks = {"": {"split": "validation"}}
  config.model = ml_collections.ConfigDict(dict(
      d_model=128, n_layer=8, vocab_size=vocab, pad_vocab_size_multiple=16, ssm_cfg={}))
  config.optimizer.update(dict(learning_rate=2e-3, warmup_steps=100))
  config.batch_size = 32
  config.num_train_steps = 2000
  config.eval_batch_size = 32
  config.eval_batches = 16
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.results.columns = ["bits_per_byte", "perplexity", "accuracy", "params"]
  config.results.metric = "bits_per_byte"
  return config


def _tiny_schedule(config: ml_collections.ConfigDict) -> None:
  config.optimizer.update(dict(learning_rate=3e-3, warmup_steps=15))
  config.batch_size = 16
  config.num_train_steps = 150
  config.eval_batch_size = 16
  config.eval_batches = 8
  config.log_every_steps = 50
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 150
  config.tensorboard = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"lm variant must be one of {VARIANTS}, got {variant!r}")
  tokenizer = "neox" if variant.startswith("neox") else "byte"
  tiny = variant.endswith("tiny")
  config = text_lm_config(tokenizer=tokenizer, length=64 if tiny else 256)
  config.experiment = "Language modelling on offline text (byte / NeoX tokens)"
  config.reproduces = ("Mamba (Gu & Dao, 2023) §4.2.1 and Figure 4; Mamba-2 (Dao & Gu, 2024) "
                       "Figure 9 — in miniature")
  if variant.startswith("scaling"):
    config.experiment = "Scaling in miniature: bits per byte against parameters"
    widths, models = ((16, 32, 48), ("Mamba-1", "Transformer++")) if tiny else (
        (64, 128, 192, 256), ("Mamba-1", "Mamba-2", "Transformer++"))
    config.rows = _rows(models, widths, 2 if tiny else 4, 16 if tiny else 32, tag_width=True)
    config.results.plot = "metric_vs_params"
    config.results.group_by = "group"
  else:
    config.rows = _rows(MODELS, (32,) if tiny else (128,), 2 if tiny else 4,
                        16 if tiny else 32)
  if variant == "neox":  # the held-out works are 14 windows of 32 × 256 NeoX tokens
    config.eval_batches = 12
  if tiny:
    _tiny_schedule(config)
  return config
