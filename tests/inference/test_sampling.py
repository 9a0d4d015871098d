"""Logits processors on hand-made distributions, and sampling determinism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.inference.sampling import (SamplingParams, apply_repetition_penalty,
                                          min_p_filter, process_logits, sample, top_k_filter,
                                          top_p_filter)

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (in a shuffled order) as log-probabilities.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = jnp.asarray(np.log(PROBS)[None, :])


def _kept(logits):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits)[0])).tolist())


def test_top_k_keeps_exactly_k_largest():
  assert _kept(top_k_filter(LOGITS, 1)) == {1}
  assert _kept(top_k_filter(LOGITS, 3)) == {1, 3, 4}  # 0.4, 0.3, 0.15
  assert _kept(top_k_filter(LOGITS, 0)) == set(range(5))  # off
  kept = top_k_filter(LOGITS, 2)
  np.testing.assert_array_equal(np.asarray(kept)[0, [1, 3]], np.asarray(LOGITS)[0, [1, 3]])


def test_top_p_keeps_the_smallest_set_reaching_p():
  # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05; cumulative 0.4, 0.7, 0.85, 0.95, 1.0.
  assert _kept(top_p_filter(LOGITS, 0.4)) == {1}  # 0.4 reaches 0.4
  assert _kept(top_p_filter(LOGITS, 0.41)) == {1, 3}  # needs 0.4 + 0.3
  assert _kept(top_p_filter(LOGITS, 0.7)) == {1, 3}
  assert _kept(top_p_filter(LOGITS, 0.8)) == {1, 3, 4}  # 0.85 ≥ 0.8
  assert _kept(top_p_filter(LOGITS, 0.01)) == {1}  # the top token always stays
  assert _kept(top_p_filter(LOGITS, 1.0)) == set(range(5))


def test_min_p_threshold_is_relative_to_the_top_probability():
  # min_p 0.5: p ≥ 0.5 · 0.4 = 0.2 keeps 0.4 and 0.3; min_p 0.3: p ≥ 0.12 adds 0.15.
  assert _kept(min_p_filter(LOGITS, 0.5)) == {1, 3}
  assert _kept(min_p_filter(LOGITS, 0.3)) == {1, 3, 4}
  # Shifting all logits (another normaliser) changes nothing.
  assert _kept(min_p_filter(LOGITS + 3.0, 0.3)) == {1, 3, 4}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
  logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
  presence = jnp.asarray([[True, True, False, False]])
  out = apply_repetition_penalty(logits, presence, 2.0)
  # HF: seen tokens: 2 / 2 = 1, −2 · 2 = −4; unseen unchanged.
  np.testing.assert_array_equal(np.asarray(out), [[1.0, -4.0, 1.0, -1.0]])
  # Greedy applies the penalty too: token 0 falls from 2.0 to 0.5 below token 2's 1.0.
  params = SamplingParams(repetition_penalty=4.0)
  assert int(sample(logits, params, presence=presence)[0]) == 2


def test_temperature_scales_before_filters():
  params = SamplingParams(temperature=2.0)
  np.testing.assert_allclose(np.asarray(process_logits(LOGITS, params)),
                             np.asarray(LOGITS) / 2.0)


def test_sampling_is_deterministic_for_a_key_and_follows_the_distribution():
  params = SamplingParams(temperature=1.0, top_k=3)
  logits = jnp.tile(LOGITS, (4000, 1))
  a = sample(logits, params, jax.random.key(0))
  b = sample(logits, params, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  counts = np.bincount(np.asarray(a), minlength=5) / 4000
  expected = np.zeros(5)
  expected[[1, 3, 4]] = PROBS[[1, 3, 4]] / PROBS[[1, 3, 4]].sum()  # renormalised top-3
  np.testing.assert_allclose(counts, expected, atol=0.03)
  assert not np.array_equal(np.asarray(a), np.asarray(sample(logits, params,
                                                             jax.random.key(1))))


def test_greedy_is_argmax_and_needs_no_key():
  assert int(sample(LOGITS, SamplingParams())[0]) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_sampling_params_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_sampling_needs_a_key_and_presence():
  with pytest.raises(ValueError, match="key"):
    sample(LOGITS, SamplingParams(temperature=1.0))
  with pytest.raises(ValueError, match="presence"):
    sample(LOGITS, SamplingParams(repetition_penalty=1.2))
