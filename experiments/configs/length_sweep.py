"""Rows that train one model at several sequence lengths (the papers' length-scaling figures).

Not a config itself: ``dna_pretrain.py``, ``great_apes.py`` and ``audio_piano.py`` build their
rows with :func:`length_rows`. Each row trains from scratch at its own length with a constant
number of tokens per batch (batch = tokens // length, at least 1; the Mamba paper keeps
2^20 tokens per batch across its DNA lengths) and is evaluated on the test split at the same
length, on a constant number of test tokens (or of sequences, for classification).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def length_rows(arch: str, model: Mapping[str, Any], lengths: Sequence[int], *,
                tokens_per_batch: int, eval_tokens: int = 0, eval_sequences: int = 0,
                max_eval_batch_tokens: int = 1 << 16,
                paper: Mapping[int, Mapping[str, float]] | None = None) -> list[dict]:
  """One row per length: ``{arch} L={length}``, tagged ``arch`` (the results plot's groups).

  Args:
    arch: the model's label (``config.results.group_by = "arch"``).
    model: MambaConfig field overrides of the row.
    lengths: training (and evaluation) lengths.
    tokens_per_batch: tokens per optimizer step; batch size = max(1, tokens // length).
    eval_tokens / eval_sequences: test set size per row, in tokens or in sequences (one of
      them > 0); evaluated in batches of at most ``max_eval_batch_tokens`` tokens.
    paper: {length: {metric: value}} read off the paper's figure, where it gives numbers.
  """
  if (eval_tokens > 0) == (eval_sequences > 0):
    raise ValueError(f"exactly one of eval_tokens and eval_sequences must be > 0, got "
                     f"{eval_tokens=} {eval_sequences=}")
  rows = []
  for length in lengths:
    sequences = eval_sequences or max(1, eval_tokens // length)
    eval_batch = max(1, min(sequences, max_eval_batch_tokens // length))
    row = {"name": f"{arch} L={length}", "model": dict(model), "task": {"length": length},
           "batch_size": max(1, tokens_per_batch // length),
           "eval_tasks": {"": {"split": "test", "batch_size": eval_batch,
                               "num_batches": max(1, sequences // eval_batch)}},
           "tags": {"arch": arch}}
    if paper and length in paper:
      row["paper"] = dict(paper[length])
    rows.append(row)
  return rows
