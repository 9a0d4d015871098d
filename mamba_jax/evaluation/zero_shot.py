"""Likelihood-based zero-shot evaluation of any ``MambaLM`` (lm-eval-harness's definitions).

For a request (context, continuation) the model scores the continuation's tokens given the
context, as lm-eval-harness's ``loglikelihood`` does:

  * trailing spaces of the context move to the front of the continuation;
  * context ids = tok(context), continuation ids = tok(context + continuation) minus the
    context's ids (so a merge across the boundary stays whole); an empty context is the
    end-of-text id;
  * the model reads (context ids + continuation ids)[-(max_length + 1):][:-1], and
    ll = Σ log p(continuation token | everything before it), greedy = every continuation
    token is the argmax.

Metrics (lm-eval-harness's):
  multiple choice   acc = [argmax_i ll_i == gold];
                    acc_norm = [argmax_i ll_i / len_i == gold], len_i the length in characters
                    of choice i (the continuation without its leading space)
  LAMBADA           acc = mean greedy; perplexity = exp(−mean ll) (per document, not per token)

Batching: requests are sorted by length, padded on the right to a bucket length (a power of
two ≥ 32, so a handful of compilations) and scored ``batch_size`` at a time by one jitted
full forward; right padding leaves every causal position's logits unchanged.

Letter legend: b batch, l length (a bucket), v vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.data.tokenization import Tokenizer
from mamba_jax.evaluation.zero_shot_data import TASKS, Example, load_examples

MIN_BUCKET = 32


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval-harness forms them (module docstring)."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  if not context:
    return [tokenizer.eot_id], tokenizer.encode(continuation)
  whole = tokenizer.encode(context + continuation)
  context_ids = tokenizer.encode(context)
  return context_ids, whole[len(context_ids):]


def _bucket(length: int) -> int:
  return max(MIN_BUCKET, 1 << (length - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cont_mask: jax.Array,
           vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """(tokens (b, l+1), cont_mask (b, l)) -> (ll (b,), greedy (b,)); one compilation per
  (model structure, bucket, batch size)."""
  model = nnx.merge(graphdef, state)
  logits = model(tokens[:, :-1])[..., :vocab_size].astype(jnp.float32)   # (b, l, v)
  logp = jax.nn.log_softmax(logits, axis=-1)
  targets = tokens[:, 1:]
  token_ll = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  hit = jnp.argmax(logits, axis=-1) == targets
  ll = jnp.sum(jnp.where(cont_mask, token_ll, 0.0), axis=-1)
  greedy = jnp.all(hit | ~cont_mask, axis=-1)
  return ll, greedy


def loglikelihoods(model: nnx.Module, tokenizer: Tokenizer,
                   requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int = 2048, vocab_size: int | None = None
                   ) -> list[tuple[float, bool]]:
  """(ll, greedy) of each (context, continuation), in the order given.

  Args:
    model: a MambaLM (any layer kinds; e.g. from ``mamba_jax.convert.load_pretrained``).
    tokenizer: the model's tokenizer (``mamba_jax.data.tokenization``).
    requests: (context, continuation) pairs.
    batch_size: rows per forward.
    max_length: the most tokens the model reads (longer requests lose their oldest tokens).
    vocab_size: logits beyond this are padding and ignored (default: the tokenizer's).
  """
  if batch_size < 1 or max_length < 2:
    raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size=} "
                     f"{max_length=}")
  vocab_size = vocab_size or tokenizer.vocab_size
  graphdef, state = nnx.split(model)
  encoded = []
  for context, continuation in requests:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    if not cont:
      raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    whole = (ctx + cont)[-(max_length + 1):]
    encoded.append((whole, min(len(cont), len(whole) - 1)))
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
  out: list[Any] = [None] * len(encoded)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = _bucket(max(len(encoded[i][0]) for i in rows) - 1)
    tokens = np.full((batch_size, length + 1), tokenizer.eot_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for r, i in enumerate(rows):
      whole, n_cont = encoded[i]
      tokens[r, :len(whole)] = whole
      mask[r, len(whole) - 1 - n_cont:len(whole) - 1] = True
    ll, greedy = jax.device_get(_score(graphdef, state, jnp.asarray(tokens),
                                       jnp.asarray(mask), vocab_size))
    for r, i in enumerate(rows):
      out[i] = (float(ll[r]), bool(greedy[r]))
  return out


def _answer_length(continuation: str) -> int:
  """Characters of the answer: the continuation without lm-eval's target delimiter " "."""
  return max(len(continuation[1:] if continuation.startswith(" ") else continuation), 1)


def metrics(examples: Sequence[Example], results: Sequence[Sequence[tuple[float, bool]]],
            kind: str) -> dict[str, float]:
  """Task metrics from each example's per-choice (ll, greedy) results."""
  if len(examples) != len(results) or not examples:
    raise ValueError(f"need one result list per example and at least one example, got "
                     f"{len(examples)} examples and {len(results)} results")
  if kind == "lambada":
    lls = [r[0][0] for r in results]
    return {"acc": float(np.mean([r[0][1] for r in results])),
            "perplexity": math.exp(-float(np.mean(lls))), "num_examples": len(examples)}
  if kind != "mc":
    raise ValueError(f"kind must be 'mc' or 'lambada', got {kind!r}")
  acc, acc_norm = [], []
  for ex, res in zip(examples, results):
    lls = np.array([ll for ll, _ in res])
    lengths = np.array([_answer_length(cont) for _, cont in ex.choices], np.float64)
    acc.append(int(np.argmax(lls)) == ex.gold)
    acc_norm.append(int(np.argmax(lls / lengths)) == ex.gold)
  return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
          "num_examples": len(examples)}


def evaluate_examples(model: nnx.Module, tokenizer: Tokenizer, examples: Sequence[Example],
                      kind: str, **kwargs: Any) -> dict[str, float]:
  """Scores every choice of every example and returns the task's metrics."""
  flat = [pair for ex in examples for pair in ex.choices]
  scored = iter(loglikelihoods(model, tokenizer, flat, **kwargs))
  results = [[next(scored) for _ in ex.choices] for ex in examples]
  return metrics(examples, results, kind)


def evaluate(model: nnx.Module, tokenizer: Tokenizer, tasks: Iterable[str] = tuple(TASKS), *,
             limit: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
  """{task: metrics} over the named tasks (``zero_shot_data.TASKS``), first ``limit`` docs."""
  out = {}
  for task in tasks:
    examples = load_examples(task, limit=limit)
    out[task] = evaluate_examples(model, tokenizer, examples, TASKS[task].kind, **kwargs)
  return out
