"""Training-memory options of the train step: block rematerialization and the chunked LM-head
loss give the same loss, metrics and update as the plain step; bad options fail clearly."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.config import MambaConfig
from mamba_jax.nn.lm import remat_blocks
from mamba_jax.training import models, optimizer
from mamba_jax.training.train_step import (chunked_masked_loss_and_accuracy, init_train_state,
                                           make_eval_step, make_train_step,
                                           masked_loss_and_accuracy)
from tests.numerics import assert_close

VOCAB = 61


def _setup(layer: str, classifier=None, length: int = 12):
  model = models.build_model(MambaConfig.tiny(layer), dtype_name="float32", seed=0,
                             classifier=classifier)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer.make_optimizer(optimizer.default_optimizer_config(), 100,
                                models.weight_decay_mask(model))
  rng = np.random.default_rng(3)
  targets_len = 1 if classifier else length
  batch = {"inputs": jnp.asarray(rng.integers(0, VOCAB, (2, length)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 2 if classifier else VOCAB,
                                               (2, targets_len)), jnp.int32),
           "mask": jnp.asarray(rng.random((2, targets_len)) < (2 if classifier else 0.7))}
  # The step donates its state: every call gets its own copy of the parameters.
  return graphdef, rest, tx, lambda: init_train_state(jax.tree.map(jnp.copy, params), tx), batch


def test_remat_and_chunked_loss_leave_the_step_unchanged():
  """One step of each memory option from the same state, on a hybrid (Mamba-2, attention,
  gated MLP): the same loss, accuracy, gradient norm and new parameters (float32: up to
  summation order); a chunk not dividing the length and one above it (one checkpointed piece
  of the whole length). Rematerialized blocks with the plain loss are the composition of the
  (True, 100) and (False, 0) paths; the backbone's remat gradients are also checked by
  test_grouped_remat_keeps_only_the_group_entries."""
  graphdef, rest, tx, fresh, batch = _setup("hybrid")
  results = {}
  for remat, chunk in ((False, 0), (False, 5), (True, 100), (2, 5)):
    step = make_train_step(graphdef, rest, tx, VOCAB, remat=remat, loss_chunk=chunk)
    state, metrics = step(fresh(), batch)
    results[(remat, chunk)] = (state["params"], metrics)
  ref_params, ref = results[(False, 0)]
  for key, (params, metrics) in results.items():
    for name in ("loss", "accuracy", "grad_norm"):
      assert_close(metrics[name], ref[name], 1e-6, f"{key} {name}")
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      assert_close(got, want, 1e-6, f"{key} params")
  # The options change the compiled program: rematerialization recomputes each block
  # (one more forward's worth of ops in the step), so the options are really taken.
  ops = {}
  for remat in (False, True):
    lowered = make_train_step(graphdef, rest, tx, VOCAB, remat=remat).lower(fresh(), batch)
    ops[remat] = lowered.as_text().count("\n")
  assert ops[True] > ops[False]


def _six_mamba2_blocks():
  """A 6-block tiny Mamba-2 LM split for jax.grad: (d_model, params, loss(params, remat)) with
  loss = Σ hidden_states(ids, remat)² over one (1, 24) sequence."""
  config = MambaConfig.tiny("Mamba2").replace(n_layer=6)
  model = models.build_model(config, dtype_name="float32", seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, 24)), jnp.int32)

  def loss(params, remat):
    return jnp.sum(nnx.merge(graphdef, params, rest).hidden_states(ids, remat=remat) ** 2)
  return config.d_model, params, loss


def _saved_stream(loss, params, remat, d_model: int) -> list[str]:
  """The lines of jax.ad_checkpoint.print_saved_residuals for the arrays that the backward of
  loss(params, remat) keeps and that are shaped like the residual stream (1, 24, d)."""
  import contextlib
  import io
  from jax.ad_checkpoint import print_saved_residuals
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(lambda p: loss(p, remat), params)
  return [line for line in printed.getvalue().splitlines()
          if line.split(" ")[0].endswith(f"[1,24,{d_model}]")]


def test_grouped_remat_keeps_only_the_group_entries():
  """What the backward keeps of (b, l, d) size for 6 blocks: every intermediate without
  remat, the two arrays entering each block with remat=True, those entering each group of 3
  with remat=3 (jax.ad_checkpoint.print_saved_residuals); the gradients are the same."""
  d_model, params, loss = _six_mamba2_blocks()
  counts = {remat: len(_saved_stream(loss, params, remat, d_model))
            for remat in (False, True, 3)}
  assert counts[3] < counts[True] < counts[False], counts
  assert counts[True] - counts[3] >= 2 * (6 - 2) - 1, counts   # 5 block entries -> 1 group's
  grads = {remat: jax.grad(loss)(params, remat) for remat in (False, 3)}
  for got, want in zip(jax.tree.leaves(grads[3]), jax.tree.leaves(grads[False])):
    assert_close(got, want, 1e-6, "grouped remat gradient")


def test_partial_remat_keeps_the_other_blocks_activations():
  """remat=0.5 on 6 blocks rematerializes blocks 0, 2, 4 (lm.remat_blocks): the backward keeps
  fewer (b, l, d) arrays than without remat and more than with every block rematerialized;
  the gradients are the same."""
  assert remat_blocks(6, 0.5) == {0, 2, 4} and remat_blocks(48, 0.25) == set(range(0, 48, 4))
  assert remat_blocks(6, 0.05) == set()
  d_model, params, loss = _six_mamba2_blocks()
  counts = {remat: len(_saved_stream(loss, params, remat, d_model))
            for remat in (False, True, 0.5)}
  assert counts[True] < counts[0.5] < counts[False], counts
  grads = {remat: jax.grad(loss)(params, remat) for remat in (False, 0.5)}
  for got, want in zip(jax.tree.leaves(grads[0.5]), jax.tree.leaves(grads[False])):
    assert_close(got, want, 1e-6, "partial remat gradient")


@pytest.mark.parametrize("remat", [1.0, 0.0, -0.5, "yes"])
def test_bad_remat_is_refused(remat):
  graphdef, rest, tx, _, _ = _setup("Mamba1")
  with pytest.raises(ValueError, match="remat"):
    make_train_step(graphdef, rest, tx, VOCAB, remat=remat)


def test_eval_step_chunked_sums_match():
  graphdef, rest, tx, fresh, batch = _setup("Mamba1", length=11)
  params = fresh()["params"]
  whole = make_eval_step(graphdef, rest, VOCAB)(params, batch)
  chunked = make_eval_step(graphdef, rest, VOCAB, loss_chunk=4)(params, batch)
  for name in ("loss_sum", "correct", "count"):
    assert_close(chunked[name], whole[name], 1e-6, name)


@pytest.mark.parametrize("chunk", [1, 4, 7, 30])
def test_chunked_loss_against_whole_logits(chunk):
  """Chunk sizes dividing the length, not dividing it (padding unscored) and above it."""
  rng = np.random.default_rng(chunk)
  hidden = jnp.asarray(rng.normal(size=(3, 14, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
  head = lambda h: h @ w
  targets = jnp.asarray(rng.integers(0, 9, (3, 14)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 14)) < 0.6)
  want = masked_loss_and_accuracy(head(hidden), targets, mask, 9)
  got = chunked_masked_loss_and_accuracy(head, hidden, targets, mask, 9, chunk)
  for name in ("loss_sum", "correct", "count"):
    assert_close(got[name], want[name], 1e-6, f"chunk {chunk} {name}")
  # and its gradient with respect to the hidden states and the head
  loss = lambda f, h, ww: f(lambda x: x @ ww, h)["loss_sum"]
  g_want = jax.grad(lambda h, ww: loss(lambda hd, x: masked_loss_and_accuracy(
      hd(x), targets, mask, 9), h, ww), argnums=(0, 1))(hidden, w)
  g_got = jax.grad(lambda h, ww: loss(lambda hd, x: chunked_masked_loss_and_accuracy(
      hd, x, targets, mask, 9, chunk), h, ww), argnums=(0, 1))(hidden, w)
  for got_g, want_g in zip(g_got, g_want):
    assert_close(got_g, want_g, 1e-6, f"chunk {chunk} gradient")


def test_classifier_remat_and_chunk_refusal():
  classifier = {"num_classes": 2, "pooling": "mean"}
  graphdef, rest, tx, fresh, batch = _setup("Mamba1", classifier=classifier)
  plain = make_train_step(graphdef, rest, tx, 2)(fresh(), batch)[1]
  remat = make_train_step(graphdef, rest, tx, 2, remat=True)(fresh(), batch)[1]
  assert_close(remat["loss"], plain["loss"], 1e-6, "classifier remat loss")
  with pytest.raises(ValueError, match="loss_chunk=4 needs a language model"):
    make_train_step(graphdef, rest, tx, 2, loss_chunk=4)(fresh(), batch)


def test_bad_memory_options_are_refused():
  graphdef, rest, tx, fresh, batch = _setup("Mamba1")
  with pytest.raises(ValueError, match="loss_chunk must be an int >= 0"):
    make_train_step(graphdef, rest, tx, VOCAB, loss_chunk=-1)
  with pytest.raises(ValueError, match="remat must be a bool"):
    make_train_step(graphdef, rest, tx, VOCAB, remat="yes")
  with pytest.raises(ValueError, match="remat must be a bool, a block-group size"):
    make_train_step(graphdef, rest, tx, VOCAB, remat=-2)
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    chunked_masked_loss_and_accuracy(lambda h: h, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), int),
                                     jnp.ones((1, 4), bool), 2, 0)
  model = nnx.merge(graphdef, fresh()["params"], rest)
  with pytest.raises(ValueError, match="remat=True is for training"):
    model(batch["inputs"], remat=True, return_state=True)
