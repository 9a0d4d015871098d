"""Induction heads: Mamba (Gu & Dao, 2023), Table 2 — length extrapolation.

The task (Mamba §4.1.2; ``mamba_jax.data.synthetic.InductionHeads``): random tokens from a
vocabulary of 16 with a special token s appearing twice; at its second occurrence (the last
position) the model must output the token that followed the first. Trained at length 256,
tested at lengths 2^6 … 2^20. Accuracy: exact match at the last position.

Rows: MHA-Abs (learned absolute positions), MHA-RoPE, MHA-xPos (RoPE with xPos's decay,
Sun et al., 2022: γ 0.4, scale base 512), H3, Mamba; 2-layer models, d_model 64 (the
paper's setting). The paper's result: Mamba solves the task at every length up to 2^20
(100 %, 4000× the training length); the attention models are perfect near the training
length and fail beyond about twice it; H3 degrades with length. Only Mamba's row carries a
paper number below (1.0 at every length); the others are read off a figure, so results.md
leaves them blank.
MHA-Abs cannot run beyond its position table (256), and the attention rows are evaluated up
to 2^14 (their score matrix grows as l²), "—" beyond.

Training recipe (our choice where the paper is not specific): batch 32, 20K steps,
AdamW lr 1e-3 with warmup and cosine decay, weight decay 0.1.

Commands:
  python -m experiments.main --config=experiments/configs/induction_heads.py \
      --workdir=/tmp/induction_heads
  python -m experiments.main --config=experiments/configs/induction_heads.py:tiny \
      --workdir=/tmp/induction_heads_tiny

Variants:
  (default) the paper's setting above. Paper: Mamba 100 % at 2^6 … 2^20. Measured on one
            H100 with 10K steps and rows MHA-RoPE, Mamba (276 s): Mamba 100 % up to 2^11,
            then 75 / 56 / 38 % at 2^12 / 2^13 / 2^14; MHA-RoPE 100 % up to 2^8, 88 % at 2^9,
            26 % at 2^10 (experiments/README.md).
  tiny      train length 64 with vocabulary 8, d_model 32, rows MHA-RoPE, MHA-xPos and
            Mamba, 1200 steps, tests at 2^5 … 2^12. Measured (2 CPU cores, 254 s) for
            MHA-RoPE and Mamba: both 100 % at 64; at 256 / 512 Mamba 100 / 96.9 %, MHA-RoPE
            78.1 / 21.9 %. MHA-xPos, run alone (83 s), had not converged (training accuracy
            86 %): 79.7 % at 64, 32.8 / 14.1 % at 256 / 512.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import base_config

VARIANTS = ("", "tiny")


def _eval_tasks(log2_lengths, long_from: int):
  """accuracy@<length> for each length; from 2^long_from on, 16 sequences one at a time."""
  tasks = {}
  for k in log2_lengths:
    fields = {"length": 2**k}
    if k >= long_from:
      fields.update(batch_size=1, num_batches=16)
    tasks[str(2**k)] = fields
  return tasks


def _attention(positions: str, train_length: int, heads: int, max_eval: int):
  cfg = {"num_heads": heads, "positions": positions}
  if positions == "absolute":
    cfg["max_position"] = train_length
  return {"attn_layer_idx": (0, 1), "attn_cfg": cfg}, (train_length if positions ==
                                                         "absolute" else max_eval)


def _rows(names, train_length: int, heads: int, max_attention_eval: int, log2_lengths):
  rows = []
  for name in names:
    if name.startswith("MHA"):
      positions = {"MHA-Abs": "absolute", "MHA-RoPE": "rope", "MHA-xPos": "xpos"}[name]
      model, max_eval = _attention(positions, train_length, heads, max_attention_eval)
      rows.append({"name": name, "model": model, "max_eval_length": max_eval})
    elif name == "H3":
      rows.append({"name": name, "model": {"ssm_cfg": {"layer": "H3"}}})
    else:
      rows.append({"name": name, "model": {"ssm_cfg": {"layer": "Mamba1"}},
                   "paper": {f"accuracy@{2**k}": 1.0 for k in log2_lengths}})
  return rows


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"induction_heads variant must be one of {VARIANTS}, got {variant!r}")
  config = base_config()
  config.experiment = "Induction heads"
  config.reproduces = "Mamba (Gu & Dao, 2023), Table 2"
  config.task = ml_collections.ConfigDict(dict(name="induction_heads", length=256,
                                               vocab_size=16))
  config.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layer=2, vocab_size=16, pad_vocab_size_multiple=8,
      ssm_cfg={"d_state": 16}))
  lengths = range(6, 21)
  config.eval_tasks = _eval_tasks(lengths, long_from=12)
  config.rows = _rows(("MHA-Abs", "MHA-RoPE", "MHA-xPos", "H3", "Mamba"), 256, 4, 2**14, lengths)
  config.optimizer.update(dict(learning_rate=1e-3, warmup_steps=500))
  config.batch_size = 32
  config.num_train_steps = 20_000
  config.eval_batch_size = 32
  config.eval_batches = 8
  config.log_every_steps = 200
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.results.columns = [f"accuracy@{2**k}" for k in lengths]
  config.results.plot = "accuracy_vs_length"

  if variant == "tiny":
    config.task.update(dict(length=64, vocab_size=8))
    config.model.update(dict(d_model=32, vocab_size=8))
    lengths = range(5, 13)
    config.eval_tasks = _eval_tasks(lengths, long_from=11)
    config.rows = _rows(("MHA-RoPE", "MHA-xPos", "Mamba"), 64, 2, 2**12, lengths)
    config.optimizer.update(dict(learning_rate=3e-3, warmup_steps=50))
    config.batch_size = 32
    config.num_train_steps = 1200
    config.eval_batch_size = 32
    config.eval_batches = 2
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 400
    config.results.columns = [f"accuracy@{2**k}" for k in lengths]
  return config
