"""Synthetic sequence tasks of the Mamba and Mamba-2 papers, generated on the fly.

Every task is a random-access source: ``task[i]`` is a pure function of ``(seed, i)`` (a numpy
``Generator`` seeded with the pair), so a data order is reproducible, shardable and resumable
from nothing but an index. A record is a dict of numpy arrays of one length l:

  inputs   (l,) int32    token ids fed to the model
  targets  (l,) int32    the token the model must predict at each position (0 where unscored)
  mask     (l,) bool     True at the positions that are scored (loss and accuracy)

The model's logits at position t are compared with ``targets[t]`` (no shift is applied by the
training loop; the tasks place their targets where the answer is due).

Tasks:
  * selective copying (Mamba, Section 4.1.1 / Table 1): data tokens scattered among noise
    tokens, to be reproduced in order after a run of marker tokens.
  * induction heads (Mamba, Section 4.1.2 / Table 2): after a special token appears a second
    time, predict the token that followed its first occurrence.
  * multi-query associative recall (Zoology, Arora et al. 2023; Mamba-2 Section 9.1 / Figure 8):
    key-value pairs, then the keys are queried again and the model must answer each value.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

Record = dict[str, np.ndarray]


def _rng(seed: int, index: int) -> np.random.Generator:
  """A generator that depends only on (seed, index)."""
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got {seed=} {index=}")
  return np.random.default_rng([seed, index])


def check_int(name: str, value: int, minimum: int = 1) -> None:
  """Raises unless ``value`` is an int >= ``minimum`` (the tasks' size fields)."""
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class SyntheticTask(Protocol):
  """What the pipeline needs from a task: sequence length, vocabulary, records by index."""

  seed: int
  num_records: int

  @property
  def seq_len(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Record: ...


@dataclasses.dataclass(frozen=True)
class SelectiveCopying:
  """Selective copying: remember the non-noise tokens, in order, across a noisy span.

  Layout (vocabulary v, ``num_tokens`` m, ``length`` n):
    token 0 is noise, tokens 1 .. v-2 are data, token v-1 is the marker.
    positions [0, n + m): m data tokens at sorted random positions, noise elsewhere;
    positions [n + m, n + 2m): m markers; at marker j the target is the j-th data token.
  So ``seq_len = n + 2m`` and the scored positions are the last m. This is the layout of the
  task's original generator in the S4 code base (with ``variable=True``).
  """

  length: int
  num_tokens: int
  vocab_size: int
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length)
    check_int("num_tokens", self.num_tokens)
    check_int("vocab_size", self.vocab_size, minimum=3)
    check_int("num_records", self.num_records)

  @property
  def seq_len(self) -> int:
    return self.length + 2 * self.num_tokens

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> Record:
    rng = _rng(self.seed, index)
    n, m, v = self.length, self.num_tokens, self.vocab_size
    data = rng.integers(1, v - 1, size=m)
    positions = np.sort(rng.choice(n + m, size=m, replace=False))
    inputs = np.zeros(n + 2 * m, np.int32)
    inputs[positions] = data
    inputs[n + m:] = v - 1
    targets = np.zeros(n + 2 * m, np.int32)
    targets[n + m:] = data
    mask = np.zeros(n + 2 * m, bool)
    mask[n + m:] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


@dataclasses.dataclass(frozen=True)
class InductionHeads:
  """Induction heads: ... s a ... s -> a.

  Layout (vocabulary v, ``length`` l): tokens 0 .. v-2 are uniform random noise, token v-1 is
  the special token s. s appears at a random position p in [0, l-3] followed by the answer a at
  p+1, and again at the last position l-1, where the target is a. s appears nowhere else, so
  the answer is unambiguous. One scored position per record.
  """

  length: int
  vocab_size: int
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length, minimum=3)
    check_int("vocab_size", self.vocab_size, minimum=3)
    check_int("num_records", self.num_records)

  @property
  def seq_len(self) -> int:
    return self.length

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> Record:
    rng = _rng(self.seed, index)
    l, v = self.length, self.vocab_size
    special = v - 1
    inputs = rng.integers(0, v - 1, size=l).astype(np.int32)
    p = int(rng.integers(0, l - 2))
    answer = inputs[p + 1]
    inputs[p] = special
    inputs[l - 1] = special
    targets = np.zeros(l, np.int32)
    targets[l - 1] = answer
    mask = np.zeros(l, bool)
    mask[l - 1] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


@dataclasses.dataclass(frozen=True)
class MultiQueryAssociativeRecall:
  """MQAR: k1 v1 k2 v2 ... kN vN, then each key again; answer its value at the query.

  Layout (vocabulary v, ``length`` l, ``num_kv_pairs`` N): token 0 is noise; keys are distinct
  tokens from [1, v/2), values tokens from [v/2, v). Positions [0, 2N) hold the pairs. The rest
  is noise except N queries: every key once, in random order, at distinct random even offsets
  of the query span (uniformly placed; Zoology draws the gaps from a power law). The target at
  a query is that key's value. Requires ``l >= 4N`` and ``v/2 - 1 >= N``.
  """

  length: int
  num_kv_pairs: int
  vocab_size: int
  seed: int = 0
  num_records: int = 2**40

  def __post_init__(self):
    check_int("length", self.length)
    check_int("num_kv_pairs", self.num_kv_pairs)
    check_int("vocab_size", self.vocab_size, minimum=4)
    check_int("num_records", self.num_records)
    if self.length < 4 * self.num_kv_pairs:
      raise ValueError(f"length must be >= 4 * num_kv_pairs, got length={self.length} "
                       f"num_kv_pairs={self.num_kv_pairs}")
    if self.vocab_size // 2 - 1 < self.num_kv_pairs:
      raise ValueError(f"vocab_size // 2 - 1 must be >= num_kv_pairs (distinct keys), got "
                       f"vocab_size={self.vocab_size} num_kv_pairs={self.num_kv_pairs}")

  @property
  def seq_len(self) -> int:
    return self.length

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> Record:
    rng = _rng(self.seed, index)
    l, n, v = self.length, self.num_kv_pairs, self.vocab_size
    keys = rng.choice(np.arange(1, v // 2), size=n, replace=False)
    values = rng.integers(v // 2, v, size=n)
    inputs = np.zeros(l, np.int32)
    inputs[0:2 * n:2] = keys
    inputs[1:2 * n:2] = values
    slots = np.sort(rng.choice((l - 2 * n) // 2, size=n, replace=False))
    query_positions = 2 * n + 2 * slots
    order = rng.permutation(n)
    inputs[query_positions] = keys[order]
    targets = np.zeros(l, np.int32)
    targets[query_positions] = values[order]
    mask = np.zeros(l, bool)
    mask[query_positions] = True
    return {"inputs": inputs, "targets": targets, "mask": mask}


TASKS = {
    "selective_copying": SelectiveCopying,
    "induction_heads": InductionHeads,
    "mqar": MultiQueryAssociativeRecall,
}


def make_task(name: str, **kwargs) -> SyntheticTask:
  """Builds the task ``name`` (one of ``TASKS``) from its fields."""
  if name not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
  return TASKS[name](**kwargs)
