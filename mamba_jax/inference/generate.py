"""``generate``: prompt in, prompt + continuation out, for batches with or without padding.

  generate(model, input_ids, max_new_tokens, temperature=..., top_k=..., ...) -> (b, l + t)

Steps: left-align the rows (a right-padded row's tokens are moved to the end of the row, in
order, pads first), one jitted parallel prefill (:mod:`.prefill`), one jitted decoding loop
(:mod:`.decode`), then the new tokens are put right after each row's last prompt token.

Correct batched generation: every row's continuation starts from the state after its own
last token and never sees pads, so a row of a padded batch generates what the same prompt
generates alone (left or right padded). The output keeps each row's layout: row r is its
prompt positions up to and including its last token, the t new tokens, then its trailing pads
(right padding) — i.e. the new tokens are inserted after the last token; the output's
attention mask is the input's with t ones inserted there. After a row emits ``eos_id`` its
remaining new positions hold ``eos_id``.

Letter legend: b batch, l prompt length, t max_new_tokens, v vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.inference.cache import Cache, init_cache
from mamba_jax.inference.decode import TRACE_COUNTS, TokenCallback, decode, presence_of
from mamba_jax.inference.prefill import check_prefill_args, like_cache, prefill, prefill_piece
from mamba_jax.inference.sampling import SamplingParams
from mamba_jax.nn.lm import MambaLM
from mamba_jax.ops.checks import (check_float_dtype, check_integer, check_rank, check_shape,
                                  is_concrete)


def left_align(input_ids: jax.Array, attention_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Moves every row's tokens (mask 1) to the end of the row, in order; pads first.

  Returns (ids (b, l) with pad ids replaced by 0, mask (b, l) left-padded).
  """
  mask = attention_mask.astype(jnp.int32)
  order = jnp.argsort(mask, axis=1, stable=True)  # pads (0) first, each group in order
  ids = jnp.take_along_axis(jnp.where(mask == 1, input_ids, 0), order, axis=1)
  return ids, jnp.take_along_axis(mask, order, axis=1)


def insert_after_last(input_ids: jax.Array, attention_mask: Optional[jax.Array],
                      new: jax.Array) -> jax.Array:
  """(b, l) prompt and (b, t) new tokens -> (b, l + t), new tokens after each row's last
  token (position l for an unpadded or left-padded row)."""
  batch, length = input_ids.shape
  t = new.shape[1]
  if attention_mask is None:
    return jnp.concatenate([input_ids, new.astype(input_ids.dtype)], axis=1)
  pos = jnp.arange(length)
  last = jnp.max(jnp.where(attention_mask == 1, pos, -1), axis=1)[:, None]  # (b, 1)
  j = jnp.arange(length + t)[None, :]
  from_prompt = jnp.take_along_axis(input_ids, jnp.clip(jnp.where(j <= last, j, j - t), 0,
                                                        length - 1), axis=1)
  from_new = jnp.take_along_axis(new.astype(input_ids.dtype),
                                 jnp.clip(j - last - 1, 0, max(t - 1, 0)), axis=1)
  return jnp.where((j > last) & (j <= last + t), from_new, from_prompt)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "padded",
                                             "state_dtype"))
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
             attention_mask: Optional[jax.Array], *, max_length: int, padded: bool,
             state_dtype: Optional[jnp.dtype]) -> tuple[jax.Array, Cache]:
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  return prefill(model, input_ids, max_length=max_length,
                 attention_mask=attention_mask if padded else None, state_dtype=state_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length", "fresh"),
                   donate_argnames=("layers",))
def _prefill_piece(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array,
                   mask: Optional[jax.Array], layers: tuple[Any, ...], *, max_length: int,
                   fresh: bool) -> tuple[jax.Array, tuple[Any, ...]]:
  TRACE_COUNTS["prefill"] += 1
  return prefill_piece(nnx.merge(graphdef, state), ids, layers, fresh=fresh, mask=mask,
                       max_length=max_length)


def jit_prefill(model: MambaLM, input_ids: jax.Array, *, max_length: int,
                attention_mask: Optional[jax.Array] = None,
                chunk_size: Optional[int] = None,
                state_dtype: Any = None) -> tuple[jax.Array, Cache]:
  """:func:`mamba_jax.inference.prefill.prefill` (a new cache) compiled, once per shapes /
  options; ``state_dtype``: the cache's SSM-state storage dtype (:func:`init_cache`).

  With ``chunk_size`` below the prompt's length, each piece is a compiled call of its own
  (one program for every full piece, one for a shorter last piece), the states donated from
  one call to the next: the memory is that of one piece beside the cache. (Traced as one
  program, Transformer++ 1.3B's 128 × 2,048-token prefill in pieces of 256 and 128 tokens
  failed on an H100 to allocate another 29 and 39 GiB beside its 51 GiB KV cache; in pieces of
  64, one call each, it ran.)
  """
  if state_dtype is not None:
    state_dtype = check_float_dtype("state_dtype", state_dtype)
  graphdef, state = nnx.split(model)
  padded = attention_mask is not None
  batch, length = check_prefill_args(model, input_ids, max_length=max_length,
                                     attention_mask=attention_mask, chunk_size=chunk_size,
                                     state_dtype=state_dtype)
  if chunk_size is None or chunk_size >= length:
    return _prefill(graphdef, state, input_ids, attention_mask, max_length=max_length,
                    padded=padded, state_dtype=state_dtype)
  layers = (None,) * len(model.backbone.layers)
  for begin in range(0, length, chunk_size):
    piece = slice(begin, min(begin + chunk_size, length))
    mask = attention_mask[:, piece].astype(jnp.int32) if padded else None
    logits, layers = _prefill_piece(graphdef, state, input_ids[:, piece], mask, layers,
                                    max_length=max_length, fresh=begin == 0)
  template = jax.eval_shape(lambda: init_cache(model, batch, max_length, None, state_dtype))
  layers = tuple(like_cache(new, old) for new, old in zip(layers, template.layers))
  return logits, Cache(layers=layers, max_length=max_length)


def _check_mask(attention_mask: Any, batch: int, length: int) -> Optional[jax.Array]:
  """Validates a (b, l) 0/1 mask; returns it as int32, or None when it has no pads."""
  check_shape("attention_mask", attention_mask, (batch, length), "(batch, length)")
  if not is_concrete(attention_mask):
    raise ValueError("generate needs a concrete attention_mask (not a tracer)")
  mask = np.asarray(attention_mask)
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
  empty = np.flatnonzero(mask.sum(axis=1) == 0)
  if empty.size:
    raise ValueError(f"attention_mask rows {empty.tolist()} have no token")
  return None if np.all(mask == 1) else jnp.asarray(mask, jnp.int32)


def generate(model: MambaLM, input_ids: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_id: Optional[int] = None, attention_mask: Optional[jax.Array] = None,
             key: Optional[jax.Array] = None, prefill_chunk_size: Optional[int] = None,
             callback: Optional[TokenCallback] = None,
             state_dtype: Any = None) -> jax.Array:
  """Continues each prompt by max_new_tokens tokens.

  Args:
    model: the language model.
    input_ids: (b, l) int prompts.
    max_new_tokens: t ≥ 0 tokens to generate per row.
    temperature: 0 for greedy decoding (argmax), else the softmax temperature.
    top_k, top_p, min_p, repetition_penalty: see :mod:`mamba_jax.inference.sampling`
      (0, 1, 0, 1 switch them off).
    eos_id: end-of-sequence id: a row stops after it and is filled with it.
    attention_mask: optional (b, l), 1 = token, 0 = pad; left or right padding (any layout:
      a row's tokens are taken in order). None: no padding.
    key: PRNG key, required when temperature > 0; a fixed key gives a fixed result.
    prefill_chunk_size: feed the prompt in pieces of this many tokens (same result; bounds
      the prefill's activation memory).
    callback: ``callback(i, tokens (b,))`` for each new token, from inside the compiled loop
      (streaming).
    state_dtype: storage dtype of the SSM states while decoding (None: float32, exact;
      jnp.bfloat16 as mamba_ssm for a bf16 model: half the state traffic per token, updates
      still in float32, logits within bf16 rounding of float32 states). See
      :func:`mamba_jax.inference.cache.init_cache`.

  Returns:
    (b, l + t) int32 token ids: each row's prompt with its continuation inserted after its
    last token (see the module docstring).
  """
  if not isinstance(model, MambaLM):
    raise ValueError(f"model must be a MambaLM, got {type(model).__name__}")
  check_rank("input_ids", input_ids, 2, "(batch, length)")
  check_integer("input_ids", input_ids)
  batch, length = input_ids.shape
  if length < 1:
    raise ValueError(f"input_ids must hold at least one token per row, got shape "
                     f"{tuple(input_ids.shape)}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty)
  if not params.greedy and key is None:
    raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(seed)")
  vocab = model.config.vocab_size
  if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                             or not 0 <= eos_id < vocab):
    raise ValueError(f"eos_id must be an int in [0, vocab_size={vocab}), got {eos_id!r}")
  if state_dtype is not None:
    check_float_dtype("state_dtype", state_dtype)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = None if attention_mask is None else _check_mask(attention_mask, batch, length)
  if max_new_tokens == 0:
    return input_ids

  ids, aligned = (input_ids, None) if mask is None else left_align(input_ids, mask)
  logits, cache = jit_prefill(model, ids, max_length=length + max_new_tokens,
                              attention_mask=aligned, chunk_size=prefill_chunk_size,
                              state_dtype=state_dtype)
  presence = presence_of(ids, vocab, aligned) if params.uses_presence else None
  new, _, _ = decode(model, cache, logits, max_new_tokens, params=params, eos_id=eos_id,
                     key=key, presence=presence, callback=callback)
  return insert_after_last(input_ids, mask, new)
