"""Next-token selection: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The logits processors follow HF transformers' definitions and order:

  1. repetition penalty (Keskar et al., 2019, CTRL §4.1): for every token already present in
     the row (prompt or generated), logit / penalty if the logit is > 0, logit · penalty
     otherwise (HF ``RepetitionPenaltyLogitsProcessor``); applied before greedy too.
  2. temperature: logits / T; T = 0 means greedy (argmax, no randomness).
  3. top-k: keep the k largest logits (k = 0: off). Ties with the k-th value are kept, as HF.
  4. top-p (nucleus, Holtzman et al., 2020): keep the smallest set of most probable tokens
     whose probability mass reaches p (the most probable token always stays; p = 1: off).
  5. min-p (Nguyen et al., 2024): keep tokens with probability ≥ min_p · max probability
     (min_p = 0: off).

Removed tokens get logit −inf; the token is drawn with ``jax.random.categorical`` from an
explicit key, so a fixed key gives a fixed token. Everything is per row and jit-friendly; the
:class:`SamplingParams` are static (hashable), so a change recompiles.

Letter legend: b batch, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token (see the module docstring); validated at construction."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    def number(name: str, value) -> float:
      if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
      return float(value)

    if number("temperature", self.temperature) < 0 or math.isinf(self.temperature):
      raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got "
                       f"{self.temperature!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
    if not 0 < number("top_p", self.top_p) <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
    if not 0 <= number("min_p", self.min_p) <= 1:
      raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p!r}")
    penalty = number("repetition_penalty", self.repetition_penalty)
    if not 0 < penalty < math.inf:
      raise ValueError(f"repetition_penalty must be finite and > 0 (1: off), got "
                       f"{self.repetition_penalty!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def uses_presence(self) -> bool:
    """Whether the repetition penalty needs the per-row set of seen tokens."""
    return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array,
                             penalty: float) -> jax.Array:
  """logits (b, v), presence (b, v) bool -> logits with seen tokens penalised (HF's rule)."""
  logits = jnp.asarray(logits)
  penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(presence, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits per row (and ties with the k-th); the rest −inf."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most probable tokens with total probability ≥ p per row.

  A token is kept when the probability mass of the tokens strictly more probable than it
  (in sorted order) is < p, so the most probable token always stays.
  """
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                         axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < p
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
  """Keeps tokens whose probability is ≥ min_p times the row's largest probability.

  p_i ≥ min_p · p_max  ⇔  logit_i ≥ logit_max + log(min_p) (softmax's normaliser cancels).
  """
  if min_p <= 0.0:
    return logits
  threshold = jnp.max(logits, axis=-1, keepdims=True) + math.log(min_p)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def process_logits(logits: jax.Array, params: SamplingParams,
                   presence: Optional[jax.Array] = None) -> jax.Array:
  """The processed logits (b, v) whose argmax (greedy) or softmax (sampling) picks the token.

  For greedy decoding only the repetition penalty applies.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if params.uses_presence:
    if presence is None:
      raise ValueError("repetition_penalty != 1 needs presence (b, v): the tokens seen")
    logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
  if params.greedy:
    return logits
  logits = logits / params.temperature
  logits = top_k_filter(logits, params.top_k)
  logits = top_p_filter(logits, params.top_p)
  return min_p_filter(logits, params.min_p)


def sample(logits: jax.Array, params: SamplingParams, key: Optional[jax.Array] = None,
           presence: Optional[jax.Array] = None) -> jax.Array:
  """Next token ids (b,) int32 from logits (b, v).

  Args:
    logits: (b, v) floating.
    params: the selection rule.
    key: a PRNG key; required unless greedy.
    presence: (b, v) bool, the tokens seen per row; required with a repetition penalty.
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
  processed = process_logits(logits, params, presence)
  if params.greedy:
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError(f"sampling with temperature={params.temperature} needs a PRNG key")
  return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
