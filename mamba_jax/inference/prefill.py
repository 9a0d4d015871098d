"""Prefill: the whole prompt in one parallel pass, returning the decoding state.

The prompt goes through each layer's full-sequence form (the chunked selective scan for
Mamba-1, chunked SSD for Mamba-2, masked attention filling the KV cache), never token by
token, and each layer returns its state after the last position. A long prompt can be fed in
pieces of ``chunk_size`` tokens, each continuing from the previous piece's state: the result
is the same as one pass. :func:`mamba_jax.inference.generate.jit_prefill` compiles one piece
(:func:`prefill_piece`) and calls it per piece with the states donated, so that its memory is
one piece's activations beside the cache; traced as one program, ``prefill`` leaves XLA free
to schedule the pieces' buffers together.

Padding (``attention_mask`` (b, l), 1 = token, 0 = pad) must be left padding here: every row's
pads come before its tokens, so that every row's last token is at position l − 1 and decoding
continues all rows from the same step (:func:`mamba_jax.inference.generate.generate` moves
right-padded rows' tokens to the right first). Each piece's mask goes to the blocks' public
``mask`` argument (``MambaLM(..., attention_mask=...)`` semantics): pads never touch a state.
SSM layers take Δ = 0 at pads and their conv sees only real predecessors (the carried conv
state before a row's first token; ``mamba_jax.ops.padding``); attention layers never attend
to pads and move a row's cache ``start`` to its first token, so positions (RoPE) count from
it. Attention layers with a conv (``attn_cfg["d_conv"] > 0``) reject padding.

Letter legend: b batch, l prompt length, L max_length, v_pad padded vocabulary, d d_model.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference.cache import Cache, check_cache, init_cache
from mamba_jax.nn.block import Block
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1State
from mamba_jax.nn.mamba2 import Mamba2State
from mamba_jax.ops.checks import check_integer, check_rank, check_shape, is_concrete


def check_left_padded(attention_mask: jax.Array, batch: int, length: int) -> None:
  """Validates a (b, l) 0/1 mask whose rows are pads then ≥ 1 token (when concrete)."""
  check_shape("attention_mask", attention_mask, (batch, length), "(batch, length)")
  if not is_concrete(attention_mask):
    return
  mask = np.asarray(attention_mask)
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
  if np.any(mask.sum(axis=1) == 0):
    raise ValueError(f"attention_mask has rows without tokens: {np.flatnonzero(mask.sum(1) == 0)}")
  if np.any(np.diff(mask.astype(np.int64), axis=1) < 0):
    raise ValueError("prefill needs a left-padded attention_mask (pads before tokens in every "
                     "row); generate() left-aligns right-padded batches")


def _layer(block: Block, hidden: jax.Array, residual: Optional[jax.Array], state: Any,
           fresh: bool, mask: Optional[jax.Array], max_length: int):
  """One block over a piece: (hidden, residual, new state); pads masked by the block."""
  if fresh:
    return block(hidden, residual, mask=mask, return_state=True, max_length=max_length)
  return block(hidden, residual, initial_state=state, mask=mask, return_state=True)


def prefill_piece(model: MambaLM, ids: jax.Array, layers: tuple[Any, ...], *, fresh: bool,
                  mask: Optional[jax.Array], max_length: int):
  """The model over one piece of the prompt, continuing from ``layers``.

  Args:
    model: the language model.
    ids: (b, c) this piece's tokens.
    layers: one state per layer after the previous piece (float32 SSM states, as the layers
      return them); ignored when ``fresh``.
    fresh: the first piece of a new cache (each layer starts from zero / an empty KV cache
      of ``max_length`` positions).
    mask: optional (b, c) int left-padded mask of this piece (module docstring).
    max_length: the KV caches' length.

  Returns:
    (logits of the piece's last position (b, v_pad) float32, the per-layer states after it).
  """
  hidden, residual = model.backbone.embedding(ids), None
  states = []
  for block, state in zip(model.backbone.layers, layers):
    hidden, residual, state = _layer(block, hidden, residual, state, fresh, mask, max_length)
    states.append(state)
  last = lambda a: None if a is None else a[:, -1]
  return model.logits_from_hidden(model.backbone._final(last(hidden), last(residual))), tuple(states)


def like_cache(state: Any, template: Any) -> Any:
  """``state`` with its SSM state rounded to ``template``'s (the cache's) state dtype; the
  layers return float32 (or wider) states, whatever the cache stores."""
  if not isinstance(state, (Mamba1State, Mamba2State)):
    return state
  return state.replace(ssm_state=state.ssm_state.astype(template.ssm_state.dtype))


def check_prefill_args(model: MambaLM, input_ids: jax.Array, *, max_length: int,
                       attention_mask: Optional[jax.Array] = None,
                       chunk_size: Optional[int] = None, cache: Optional[Cache] = None,
                       state_dtype: Any = None) -> tuple[int, int]:
  """:func:`prefill`'s argument checks (ValueError naming the argument); returns (b, l)."""
  check_rank("input_ids", input_ids, 2, "(batch, length)")
  check_integer("input_ids", input_ids)
  batch, length = input_ids.shape
  if length < 1:
    raise ValueError(f"input_ids must hold at least one token, got shape {input_ids.shape}")
  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < length:
    raise ValueError(f"max_length must be an int >= the prompt length {length}, got "
                     f"{max_length!r}")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if attention_mask is not None:
    if cache is not None:
      raise ValueError("attention_mask cannot be combined with cache: a padded prompt "
                       "starts a new cache")
    check_left_padded(attention_mask, batch, length)
  if cache is not None:
    if state_dtype is not None:
      raise ValueError("state_dtype is for a new cache; a given cache keeps its own state "
                       "dtype: pass state_dtype or cache, not both")
    check_cache(cache, model, batch)
    if cache.max_length != max_length:
      raise ValueError(f"max_length={max_length} differs from the cache's "
                       f"{cache.max_length}")
  return batch, length


def prefill(model: MambaLM, input_ids: jax.Array, *, max_length: int,
            attention_mask: Optional[jax.Array] = None, chunk_size: Optional[int] = None,
            cache: Optional[Cache] = None, dtype: Any = None,
            state_dtype: Any = None) -> tuple[jax.Array, Cache]:
  """Runs the prompt through the model in parallel; returns the next-token logits and cache.

  Args:
    model: the language model.
    input_ids: (b, l) int prompt.
    max_length: total positions the cache must hold (l plus the tokens to generate; more
      when continuing a cache); sizes the KV caches.
    attention_mask: optional (b, l) left-padded mask (1 token, 0 pad); see the module
      docstring. Not combined with ``cache``.
    chunk_size: feed the prompt in pieces of this many tokens (None: one piece).
    cache: continue from this cache (e.g. a previous prefill or decode) instead of an empty
      one; it must have room for l more positions.
    dtype: dtype of a new cache's conv states and KV caches (the model's compute dtype by
      default).
    state_dtype: storage dtype of a new cache's SSM states (:func:`init_cache`; None:
      float32, exact). The prompt runs in float32 whatever it is; the final states are
      rounded to it once. A given ``cache`` keeps its own dtypes.

  Returns:
    (logits (b, v_pad) float32 at the last position, the :class:`Cache` after the prompt;
    its SSM states in the cache's state dtype).
  """
  batch, length = check_prefill_args(model, input_ids, max_length=max_length,
                                     attention_mask=attention_mask, chunk_size=chunk_size,
                                     cache=cache, state_dtype=state_dtype)
  fresh = cache is None
  if fresh:
    cache = init_cache(model, batch, max_length, dtype, state_dtype)
  step = length if chunk_size is None else chunk_size
  layers = cache.layers
  for begin in range(0, length, step):
    piece = slice(begin, min(begin + step, length))
    mask = None if attention_mask is None else attention_mask[:, piece].astype(jnp.int32)
    logits, layers = prefill_piece(model, input_ids[:, piece], layers,
                                   fresh=fresh and begin == 0, mask=mask, max_length=max_length)
  layers = tuple(like_cache(new, old) for new, old in zip(layers, cache.layers))
  return logits, Cache(layers=layers, max_length=max_length)

