"""Prefill against the full forward: prefill + steps == forward logits, chunked == one-shot,
and padded rows == the same prompt alone (left padding; right padding is left-aligned by
generate, tested in test_generate.py; the masked model forward itself, every layout, in
tests/nn/test_padding_mask.py). Float64 tiny models, so the comparisons are tight."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.inference.cache import Cache, astype_states, init_cache
from mamba_jax.inference.decode import TRACE_COUNTS, decode_step
from mamba_jax.inference.generate import jit_prefill
from mamba_jax.inference.prefill import prefill
from mamba_jax.nn.attention import KVCache
from mamba_jax.nn.lm import MambaLM
from tests.numerics import assert_close

# Float64 models; attention takes its softmax in float32 (mamba_jax.nn.attention), and the
# one-shot and cached attention paths round differently there.
RTOL = {"Mamba1": 1e-10, "Mamba2": 1e-10, "hybrid": 1e-6}
KINDS = ("Mamba1", "Mamba2", "hybrid")
LENGTH, STEPS = 11, 2


@functools.cache  # one model per kind for the module: creating it costs more than a test
def _model(kind: str) -> MambaLM:
  return MambaLM(MambaConfig.tiny(kind), dtype=jnp.float64, param_dtype=jnp.float64,
                 rngs=nnx.Rngs(0))


def _ids(batch: int, length: int, vocab: int, seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def _check_rounded(half: Cache, wide: Cache) -> None:
  """half's SSM states are bfloat16 and hold wide's rounded; its other leaves equal wide's."""
  for state in half.layers:
    if not isinstance(state, KVCache):
      assert state.ssm_state.dtype == jnp.bfloat16
  jax.tree.map(np.testing.assert_array_equal, half, astype_states(wide, jnp.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_plus_steps_equals_full_forward(kind):
  """Also with bf16-stored SSM states (state_dtype, here beside the exact run, whose
  compilations it shares): the prefill computes at full precision and rounds its final
  states once; each step computes exactly what a full-precision cache holding the same
  rounded values computes, then rounds the new state; the logits stay within bf16 rounding
  of the exact ones. (Float64 models; a float32 model computes in float32 by the same rule:
  the ops promote to >= float32.)"""
  model = _model(kind)
  ids = _ids(2, LENGTH + STEPS, model.config.vocab_size)
  full = model(ids)  # (b, l + STEPS, v_pad): the reference
  logits, cache = prefill(model, ids[:, :LENGTH], max_length=LENGTH + STEPS)
  assert isinstance(cache, Cache)
  assert_close(logits, full[:, LENGTH - 1], RTOL[kind], f"{kind} prefill logits")
  half_logits, half = prefill(model, ids[:, :LENGTH], max_length=LENGTH + STEPS,
                              state_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(half_logits, logits)
  _check_rounded(half, cache)
  for t in range(STEPS):
    token = ids[:, LENGTH + t]
    logits, cache = decode_step(model, token, cache)
    assert_close(logits, full[:, LENGTH + t], RTOL[kind], f"{kind} step {t}")
    wide_logits, wide = decode_step(model, token, astype_states(half, jnp.float64))
    half_logits, half = decode_step(model, token, half)
    np.testing.assert_array_equal(half_logits, wide_logits)
    _check_rounded(half, wide)
    assert_close(half_logits, logits, 2.0 ** -8, f"{kind} step {t}, bf16 states")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["unpadded", "left_padded"])
def test_chunked_prefill_equals_one_shot(kind, padded):
  model = _model(kind)
  ids = _ids(3, LENGTH, model.config.vocab_size)
  mask = None
  if padded:  # rows of 11, 6 and 2 tokens: pads end inside, at and after the first piece
    mask = jnp.asarray(np.arange(LENGTH)[None, :] >= np.array([[0], [5], [9]]), jnp.int32)
  one_logits, one = prefill(model, ids, max_length=LENGTH + 2, attention_mask=mask)
  for chunk in (5,):  # pieces [0, 5) [5, 10) [10, 11): row 1 starts at a boundary
    logits, cache = prefill(model, ids, max_length=LENGTH + 2, attention_mask=mask,
                            chunk_size=chunk)
    assert_close(logits, one_logits, RTOL[kind], f"{kind} chunk {chunk} logits")
    for i, (a, b) in enumerate(zip(jax.tree.leaves(cache), jax.tree.leaves(one))):
      assert_close(a, b, RTOL[kind], f"{kind} chunk {chunk} state leaf {i}")


@pytest.mark.parametrize("kind, padded", [("Mamba1", False), ("Mamba2", True),
                                           ("hybrid", True)])
def test_jit_prefill_in_pieces_equals_one_shot(kind, padded):
  """jit_prefill's pieces (one compiled call each, the states donated) give the one-shot
  prefill's logits and cache, with the final SSM states rounded to the asked state dtype; the
  full pieces share one program."""
  model = _model(kind)
  ids = _ids(3, LENGTH, model.config.vocab_size, seed=3)
  mask = (jnp.asarray(np.arange(LENGTH)[None, :] >= np.array([[0], [5], [9]]), jnp.int32)
          if padded else None)
  one_logits, one = prefill(model, ids, max_length=LENGTH + 2, attention_mask=mask)
  before = TRACE_COUNTS["prefill"]
  for _ in range(2):
    logits, cache = jit_prefill(model, ids, max_length=LENGTH + 2, attention_mask=mask,
                                chunk_size=4)  # pieces [0, 4) [4, 8) [8, 11)
  assert TRACE_COUNTS["prefill"] - before == 3  # the first, the next full, the last piece
  assert_close(logits, one_logits, RTOL[kind], f"{kind} logits")
  assert jax.tree.structure(cache) == jax.tree.structure(one)
  for i, (a, b) in enumerate(zip(jax.tree.leaves(cache), jax.tree.leaves(one))):
    assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
    assert_close(a, b, RTOL[kind], f"{kind} state leaf {i}")
  _, half = jit_prefill(model, ids, max_length=LENGTH + 2, attention_mask=mask,
                        chunk_size=4, state_dtype=jnp.bfloat16)
  _check_rounded(half, cache)


@pytest.mark.slow  # generate's padded-batch tests cover this end to end
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_prefill_equals_prompt_alone(kind):
  """Each row's logits and the continuation from its state equal the unpadded prompt's."""
  model = _model(kind)
  ids = _ids(2, LENGTH, model.config.vocab_size)
  n_tokens = (LENGTH, 4)
  mask = jnp.asarray(np.arange(LENGTH)[None, :] >= LENGTH - np.array(n_tokens)[:, None],
                     jnp.int32)
  # Pads hold arbitrary ids: they must not matter.
  padded = jnp.where(mask == 1, ids, 7)
  logits, cache = prefill(model, padded, max_length=LENGTH + 2, attention_mask=mask)
  nxt = _ids(2, 2, model.config.vocab_size, seed=2)
  stepped = [logits]
  for t in range(2):
    out, cache = decode_step(model, nxt[:, t], cache)
    stepped.append(out)
  for row, n in enumerate(n_tokens):
    alone = jnp.concatenate([ids[row:row + 1, LENGTH - n:], nxt[row:row + 1]], axis=1)
    full = model(alone)[0, n - 1:]
    assert_close(jnp.stack([s[row] for s in stepped]), full, RTOL[kind], f"{kind} row {row}")


def test_prefill_rejects_bad_arguments():
  model = _model("Mamba1")
  ids = _ids(2, 5, model.config.vocab_size)
  with pytest.raises(ValueError, match="max_length"):
    prefill(model, ids, max_length=4)
  with pytest.raises(ValueError, match="left-padded"):
    prefill(model, ids, max_length=5, attention_mask=jnp.asarray([[1, 1, 1, 0, 0]] * 2))
  with pytest.raises(ValueError, match="without tokens"):
    prefill(model, ids, max_length=5, attention_mask=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="chunk_size"):
    prefill(model, ids, max_length=5, chunk_size=0)
  with pytest.raises(ValueError, match="cache"):
    prefill(model, ids, max_length=5, attention_mask=jnp.ones((2, 5), jnp.int32),
            cache=init_cache(model, 2, 5))
  with pytest.raises(ValueError, match="state_dtype or cache"):
    prefill(model, ids, max_length=5, cache=init_cache(model, 2, 5),
            state_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="state_dtype must be a real floating dtype"):
    prefill(model, ids, max_length=5, state_dtype=jnp.int8)
  # An attention layer with a conv over qkv would see pads in its window: rejected.
  conv_attn = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=61, attn_layer_idx=(0,),
                                  attn_cfg=dict(num_heads=4, d_conv=4)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_conv=4"):
    prefill(conv_attn, ids, max_length=5, attention_mask=jnp.asarray([[0, 1, 1, 1, 1]] * 2))
