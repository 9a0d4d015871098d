"""Prefill: the whole prompt in one parallel pass, returning the decoding state.

The prompt goes through each layer's full-sequence form (the chunked selective scan for
Mamba-1, chunked SSD for Mamba-2, masked attention filling the KV cache), never token by
token, and each layer returns its state after the last position. A long prompt can be fed in
pieces of ``chunk_size`` tokens, each continuing from the previous piece's state: the result
is the same as one pass (and peak activation memory is that of one piece).

Padding (``attention_mask`` (b, l), 1 = token, 0 = pad) must be left padding here: every row's
pads come before its tokens, so that every row's last token is at position l − 1 and decoding
continues all rows from the same step (:func:`mamba_jax.inference.generate.generate` moves
right-padded rows' tokens to the right first). Pads never touch a state:

* Mamba-2 layers: ``seq_idx`` puts a row's pads in segment 0 and its tokens in segment 1;
  the SSD and the conv restart at the segment change, so the tokens start from a zero state
  and a zero conv history exactly as if the row had no pads (the ops' seq_idx semantics). In
  a later piece a row whose tokens began earlier is all segment 0 and continues from the
  carried state.
* Mamba-1 / SSMNoGate layers: the mixer has no seq_idx, so it is composed here from its own
  parameters and ops: the conv input is zeroed at pads (a zero history, kept out of the conv
  window) and Δ is set to 0 at pads, so the scan leaves the state unchanged there,
  h_t = exp(0·A) h_{t−1} + 0·B_t x_t = h_{t−1}, from the zero initial state.
* attention layers: the KV cache's per-row ``start`` is the row's first token, so pads are
  never attended to, and positions (RoPE) count from it.

H3 layers and attention layers with a conv (``attn_cfg["d_conv"] > 0``) reject padding.

Letter legend: b batch, l prompt length, L max_length, v_pad padded vocabulary, d d_model.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.inference.cache import Cache, check_cache, init_cache
from mamba_jax.nn.attention import Attention, KVCache
from mamba_jax.nn.block import Block
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1Mixer, Mamba1State
from mamba_jax.nn.mamba2 import Mamba2Mixer
from mamba_jax.ops.checks import check_integer, check_rank, check_shape, is_concrete
from mamba_jax.ops.selective_scan import selective_scan


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


def _mamba1_masked(mixer: Mamba1Mixer, u: jax.Array, mask: jax.Array,
                   state: Mamba1State) -> tuple[jax.Array, Mamba1State]:
  """Mamba1Mixer.__call__ with pads (mask 0) leaving the state untouched: u (b, l, d)."""
  keep = mask[..., None].astype(bool)
  xz = mixer.in_proj(u)
  x, z = jnp.split(xz, 2, axis=-1) if mixer.GATED else (xz, None)
  x = jnp.where(keep, x, 0)
  x, conv_state = mixer.conv1d(x, activation="silu", initial_states=state.conv_state,
                               return_final_states=True)
  delta, delta_bias, B, C = mixer.ssm_inputs(x)
  real = jnp.promote_types(x.dtype, jnp.float32)
  step = jax.nn.softplus(delta.astype(real) + delta_bias.astype(real))
  step = jnp.where(keep, step, 0)
  y, ssm_state = selective_scan(x, step, mixer.A(x.dtype), B, C, D=mixer.D[...], z=z,
                                initial_state=state.ssm_state, return_final_state=True)
  return mixer.out_proj(y), Mamba1State(conv_state=conv_state.astype(state.conv_state.dtype),
                                        ssm_state=ssm_state.astype(state.ssm_state.dtype))


def _layer(block: Block, hidden: jax.Array, residual: Optional[jax.Array], state: Any,
           fresh: bool, mask: Optional[jax.Array], seq_idx: Optional[jax.Array],
           max_length: int):
  """One block over a piece: (hidden, residual, new state)."""
  mixer = block.mixer
  if mask is None:
    if fresh:
      return block(hidden, residual, return_state=True, max_length=max_length)
    return block(hidden, residual, initial_state=state, return_state=True)
  if isinstance(mixer, Mamba2Mixer):
    return block(hidden, residual, initial_state=state, seq_idx=seq_idx, return_state=True)
  if isinstance(mixer, Attention):
    # The cache's start (each row's first token) masks the pads: see prefill's padding notes.
    return block(hidden, residual, initial_state=state, return_state=True)
  # Mamba-1 / SSMNoGate: the block's add-norm and MLP around the masked mixer.
  normed, residual = block._add_norm(hidden, residual, block.norm)
  out, state = _mamba1_masked(mixer, normed, mask, state)
  hidden, residual = block._mlp(out, residual)
  return hidden, residual, state


def _check_maskable(model: MambaLM) -> None:
  for i, layer in enumerate(model.backbone.layers):
    mixer = layer.mixer
    if isinstance(mixer, Attention):
      if mixer.d_conv:
        raise ValueError(f"attention_mask: layer {i} is attention with a conv (d_conv="
                         f"{mixer.d_conv}), whose window would see pads; not supported")
    elif not isinstance(mixer, (Mamba1Mixer, Mamba2Mixer)):
      raise ValueError(f"attention_mask: layer {i} is {type(mixer).__name__}, which has no "
                       "padding support (Mamba1, SSMNoGate, Mamba2 and attention have)")


def _piece(model: MambaLM, ids: jax.Array, layers: tuple[Any, ...], fresh: bool,
           mask: Optional[jax.Array], seq_idx: Optional[jax.Array], max_length: int):
  """The model over one piece of the prompt: (logits of its last position (b, v_pad),
  the per-layer states after it)."""
  hidden, residual = model.backbone.embedding(ids), None
  states = []
  for block, state in zip(model.backbone.layers, layers):
    hidden, residual, state = _layer(block, hidden, residual, state, fresh, mask, seq_idx,
                                     max_length)
    states.append(state)
  last = lambda a: None if a is None else a[:, -1]
  return model._logits(model.backbone._final(last(hidden), last(residual))), tuple(states)


def prefill(model: MambaLM, input_ids: jax.Array, *, max_length: int,
            attention_mask: Optional[jax.Array] = None, chunk_size: Optional[int] = None,
            cache: Optional[Cache] = None, dtype: Any = None) -> tuple[jax.Array, Cache]:
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
    dtype: dtype of a new cache (the model's compute dtype by default).

  Returns:
    (logits (b, v_pad) float32 at the last position, the :class:`Cache` after the prompt).
  """
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
    _check_maskable(model)
  if cache is not None:
    check_cache(cache, model, batch)
    if cache.max_length != max_length:
      raise ValueError(f"max_length={max_length} differs from the cache's "
                       f"{cache.max_length}")

  fresh = cache is None
  if fresh:
    cache = init_cache(model, batch, max_length, dtype)
  if attention_mask is not None:
    mask = attention_mask.astype(jnp.int32)
    first = length - jnp.sum(mask, axis=1)  # (b,) each row's first token
    cache = Cache(layers=tuple(
        s.replace(start=first.astype(jnp.int32)) if isinstance(s, KVCache) else s
        for s in cache.layers), max_length=max_length)
  step = length if chunk_size is None else chunk_size
  layers = cache.layers
  for begin in range(0, length, step):
    piece = slice(begin, min(begin + step, length))
    mask = seq_idx = None
    if attention_mask is not None:
      mask = attention_mask[:, piece].astype(jnp.int32)
      # Segment 1 only for rows whose tokens begin in this piece (the carried state of the
      # others is their real state, segment 0 continues it).
      seq_idx = mask * (first >= begin)[:, None].astype(jnp.int32)
    logits, layers = _piece(model, input_ids[:, piece], layers, fresh and begin == 0, mask,
                            seq_idx, max_length)
  return logits, Cache(layers=layers, max_length=max_length)
