"""The decoding loop: one jitted step over all layers, repeated inside ``jax.lax.while_loop``.

A whole generation after the prefill is one compiled program: the loop carries the cache,
the tokens written so far, the per-row ``done`` flags and the set of seen tokens (for the
repetition penalty); each iteration runs ``MambaLM.step`` (every layer's recurrent form:
conv shift + SSM state update, or one KV-cache write and attention) and picks the next token.
The input cache is donated (its buffers become the loop's carry and the returned cache), so
decoding holds one copy of the state.

Stopping: a row that emits ``eos_id`` is done; its later positions hold ``eos_id`` and the
loop ends early once every row is done. Decoding is compiled once per (model graph, shapes,
sampling params, eos_id, max_new_tokens); :data:`TRACE_COUNTS` counts the traces.

Letter legend: b batch, t max_new_tokens, v vocabulary, v_pad padded vocabulary.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from mamba_jax.inference.cache import Cache, check_cache
from mamba_jax.inference.sampling import SamplingParams, sample
from mamba_jax.nn.lm import MambaLM
from mamba_jax.ops.checks import check_rank, check_shape

# The ops with a decoding kernel that the models' steps call: Mamba-2's fused conv + SSD step,
# Mamba-1's conv and SSM steps (ops.ssd_decode_step, ops.selective_decode_step); impl="auto"
# takes them on GPUs where they measured faster (each op's docstring).
# ``resolve_auto_as(**{op: "xla" for op in STEP_KERNEL_OPS})`` (mamba_jax.ops.impl) compiles
# the step without any, for comparison; "pallas" with all.
STEP_KERNEL_OPS = ("ssd_decode_step", "mamba1_conv_step", "mamba1_ssm_step")

# How often each jitted function was traced (compiled), by name: tests check "once".
TRACE_COUNTS: collections.Counter = collections.Counter()

TokenCallback = Callable[[Any, Any], None]


def decode_step(model: MambaLM, token_ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """One token for every row: token_ids (b,) -> (logits (b, v_pad) float32, new cache)."""
  logits, layers = model.step(token_ids, cache.layers)
  return logits, Cache(layers=layers, max_length=cache.max_length)


def presence_of(token_ids: jax.Array, vocab_size: int,
                mask: Optional[jax.Array] = None) -> jax.Array:
  """(b, v) bool: which tokens occur in each row of token_ids (b, l) (where mask is 1)."""
  batch = token_ids.shape[0]
  hits = jnp.ones(token_ids.shape, bool) if mask is None else mask.astype(bool)
  rows = jnp.arange(batch)[:, None]
  ids = jnp.clip(token_ids, 0, vocab_size - 1)
  return jnp.zeros((batch, vocab_size), bool).at[rows, ids].max(hits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "params",
                                             "eos_id", "callback"),
                   donate_argnames=("cache",))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, cache: Cache, logits: jax.Array,
            presence: Optional[jax.Array], key: jax.Array, *, max_new_tokens: int,
            params: SamplingParams, eos_id: Optional[int],
            callback: Optional[TokenCallback]):
  TRACE_COUNTS["decode"] += 1
  model = nnx.merge(graphdef, state)
  vocab = model.config.vocab_size
  batch = logits.shape[0]
  fill = 0 if eos_id is None else eos_id

  def pick(i, logits, presence, done):
    """Token i (b,) from logits (b, v_pad): only ids < vocab; done rows get eos_id."""
    tok = sample(logits[:, :vocab], params, jax.random.fold_in(key, i), presence)
    tok = jnp.where(done, fill, tok)
    if presence is not None:
      presence = presence.at[jnp.arange(batch), tok].set(True)
    if eos_id is not None:
      done = done | (tok == eos_id)
    if callback is not None:
      io_callback(callback, None, i, tok, ordered=True)
    return tok, presence, done

  tokens = jnp.full((batch, max_new_tokens), fill, jnp.int32)
  tok, presence, done = pick(0, logits, presence, jnp.zeros((batch,), bool))
  tokens = tokens.at[:, 0].set(tok)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, tokens, presence, done = carry
    logits, cache = decode_step(model, tok, cache)
    tok, presence, done = pick(i, logits, presence, done)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (jnp.zeros((), i.dtype), i))
    return i + 1, tok, cache, tokens, presence, done

  steps, _, cache, tokens, _, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), tok, cache, tokens, presence, done))
  return tokens, cache, steps


def decode(model: MambaLM, cache: Cache, logits: jax.Array, max_new_tokens: int, *,
           params: SamplingParams = SamplingParams(), eos_id: Optional[int] = None,
           key: Optional[jax.Array] = None, presence: Optional[jax.Array] = None,
           callback: Optional[TokenCallback] = None) -> tuple[jax.Array, Cache, jax.Array]:
  """Generates max_new_tokens tokens per row, continuing a prefill.

  Args:
    model: the language model.
    cache: the state after the prompt (``prefill``); donated: do not use it afterwards.
    logits: (b, v_pad) the next-token logits from the prefill.
    max_new_tokens: tokens to generate t ≥ 1; the cache must have room for t − 1 more
      positions (the last token is not fed back).
    params: the sampling rule.
    eos_id: a row stops after emitting it; later positions hold it.
    key: PRNG key (required unless greedy); token i uses ``fold_in(key, i)``.
    presence: (b, v) bool, the prompt's tokens, required with a repetition penalty.
    callback: called as ``callback(i, tokens (b,))`` from inside the loop for each step
      (``io_callback``, ordered): for streaming.

  Returns:
    (tokens (b, t) int32, the cache after the fed tokens, the number of steps run ()).
  """
  check_rank("logits", logits, 2, "(batch, vocab_padded)")
  batch = logits.shape[0]
  check_shape("logits", logits, (batch, model.config.vocab_size_padded),
              "(batch, vocab_padded)")
  check_cache(cache, model, batch)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:
    raise ValueError(f"eos_id must be in [0, vocab_size={model.config.vocab_size}), got "
                     f"{eos_id!r}")
  if params.uses_presence:
    if presence is None:
      raise ValueError("repetition_penalty != 1 needs presence: the prompt's tokens (b, v)")
    check_shape("presence", presence, (batch, model.config.vocab_size), "(batch, vocab)")
  else:
    presence = None
  if key is None:
    if not params.greedy:
      raise ValueError(f"temperature={params.temperature} samples: pass a PRNG key")
    key = jax.random.key(0)  # unused by greedy decoding
  graphdef, state = nnx.split(model)
  return _decode(graphdef, state, cache, logits, presence, key, max_new_tokens=max_new_tokens,
                 params=params, eos_id=eos_id, callback=callback)
