"""mamba_jax.ops.cross_entropy: the XLA form against float64 numpy, impl dispatch, argument errors,
leading axes, and the training loss's sums through both implementations.

The kernels' own numerics (ties, padding, tiles) are in tests/kernels/test_cross_entropy_gpu.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.cross_entropy import softmax_cross_entropy_with_accuracy
from mamba_jax.ops.impl import resolve_auto_as
from mamba_jax.training.train_step import (chunked_masked_loss_and_accuracy,
                                           masked_loss_and_accuracy)
from tests.numerics import assert_close

OP = "softmax_cross_entropy_with_accuracy"


def _numpy_reference(logits, targets, vocab_size, dloss):
  """(loss, correct, dlogits) in float64 numpy over the last axis."""
  z = np.asarray(logits, np.float64)[..., :vocab_size]
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  t = np.asarray(targets)[..., None]
  loss = lse - np.take_along_axis(z, t, -1)[..., 0]
  correct = (z.argmax(-1) == t[..., 0]).astype(np.float64)
  grad = np.exp(z - lse[..., None])
  np.put_along_axis(grad, t, np.take_along_axis(grad, t, -1) - 1.0, -1)
  dlogits = np.zeros(np.shape(logits))
  dlogits[..., :vocab_size] = grad * np.asarray(dloss)[..., None]
  return loss, correct, dlogits


@pytest.mark.parametrize("shape,vocab_size", [((7, 10), 10), ((2, 3, 16), 13), ((16,), 9)])
def test_xla_form_matches_numpy_float64(shape, vocab_size):
  """Any leading axes (none: one position), with and without padding columns."""
  rng = np.random.default_rng(list(shape) + [vocab_size])
  logits = jnp.asarray(rng.normal(size=shape) * 2.0)
  logits = logits.at[..., vocab_size:].set(50.0)  # padding above every real logit
  targets = jnp.asarray(rng.integers(0, vocab_size, shape[:-1]), jnp.int32)
  dloss = jnp.asarray(rng.normal(size=shape[:-1]))
  (loss, correct), vjp = jax.vjp(
      lambda x: softmax_cross_entropy_with_accuracy(x, targets, vocab_size, impl="xla"), logits)
  (dlogits,) = vjp((dloss, jnp.zeros_like(correct)))
  loss_ref, correct_ref, dlogits_ref = _numpy_reference(logits, targets, vocab_size, dloss)
  assert loss.shape == correct.shape == shape[:-1]
  assert loss.dtype == correct.dtype == jnp.float64  # float64 logits stay float64
  assert_close(loss, loss_ref, 1e-12, "loss")
  np.testing.assert_array_equal(correct, correct_ref)
  assert_close(dlogits, dlogits_ref, 1e-12, "dlogits")


def test_low_precision_logits_give_float32():
  logits = jnp.zeros((3, 8), jnp.bfloat16)
  loss, correct = softmax_cross_entropy_with_accuracy(logits, jnp.zeros((3,), jnp.int32), 8,
                                                      impl="xla")
  assert loss.dtype == correct.dtype == jnp.float32
  assert_close(loss, np.full(3, np.log(8.0)), 1e-6, "uniform loss")


def _pallas_calls(impl):
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda x: softmax_cross_entropy_with_accuracy(x, jnp.zeros((2, 4), jnp.int32), 30,
                                                    impl=impl)[0].sum()))(
      jnp.zeros((2, 4, 32), jnp.bfloat16))
  return str(jaxpr).count("pallas_call")


def test_impl_dispatch():
  assert _pallas_calls("xla") == 0
  assert _pallas_calls("pallas") == 2  # forward and backward kernels
  assert _pallas_calls("pallas_interpret") == 2
  assert _pallas_calls("auto") == (2 if jax.default_backend() == "gpu" else 0)
  with resolve_auto_as(**{OP: "pallas_interpret"}):
    assert _pallas_calls("auto") == 2
  with pytest.raises(ValueError, match="impl='triton' is not one of"):
    _pallas_calls("triton")


def test_auto_takes_xla_for_float64_logits():
  """float64 logits, which the kernels do not take, go to the XLA form even on a GPU."""
  jaxpr = jax.make_jaxpr(lambda x: softmax_cross_entropy_with_accuracy(
      x, jnp.zeros((2,), jnp.int32), 8))(jnp.zeros((2, 8), jnp.float64))
  assert "pallas_call" not in str(jaxpr)


@pytest.mark.parametrize("logits,targets,vocab_size,impl,match", [
    (jnp.zeros(()), jnp.zeros((), jnp.int32), 1, "xla", "logits must have shape"),
    (jnp.zeros((2, 8), jnp.int32), jnp.zeros((2,), jnp.int32), 8, "xla",
     "logits must have a floating dtype"),
    (jnp.zeros((2, 8)), jnp.zeros((3,), jnp.int32), 8, "xla",
     r"targets must have shape logits.shape\[:-1\]"),
    (jnp.zeros((2, 8)), jnp.zeros((2, 1), jnp.int32), 8, "xla",
     r"targets must have shape logits.shape\[:-1\]"),
    (jnp.zeros((2, 8)), jnp.zeros((2,), jnp.float32), 8, "xla",
     "targets must have an integer dtype"),
    (jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), 0, "xla", r"vocab_size must be an int in"),
    (jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), 9, "xla", r"in \[1, v_padded .* 8\]"),
    (jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), 4.0, "xla", "vocab_size must be an int"),
    (jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), True, "xla", "vocab_size must be an int"),
    (jnp.zeros((2, 8), jnp.float64), jnp.zeros((2,), jnp.int32), 8, "pallas",
     "impl='pallas': the kernels take float32/bfloat16/float16 logits, got float64"),
])
def test_bad_arguments_are_named(logits, targets, vocab_size, impl, match):
  with pytest.raises(ValueError, match=match):
    softmax_cross_entropy_with_accuracy(logits, targets, vocab_size, impl=impl)


def test_no_positions():
  loss, correct = softmax_cross_entropy_with_accuracy(
      jnp.zeros((0, 3, 8), jnp.bfloat16), jnp.zeros((0, 3), jnp.int32), 6,
      impl="pallas_interpret")
  assert loss.shape == correct.shape == (0, 3)


def test_masked_loss_and_accuracy_same_through_both_impls():
  """The training loss's sums and their gradient: the kernels (interpreted) against the XLA
  form, bf16 logits with padding columns; unscored positions contribute nothing, gradient
  included."""
  rng = np.random.default_rng(3)
  vocab_size, v_padded = 250, 256
  logits = jnp.asarray(3.0 * rng.normal(size=(2, 5, v_padded)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, vocab_size, (2, 5)), jnp.int32)
  targets = targets.at[0, :3].set(jnp.argmax(logits[0, :3, :vocab_size], axis=-1))
  mask = jnp.asarray(rng.random((2, 5)) < 0.6).at[0, 0].set(True).at[1, 0].set(False)

  def sums(impl):
    with resolve_auto_as(**{OP: impl}):
      fn = lambda x: masked_loss_and_accuracy(x, targets, mask, vocab_size)
      out, vjp = jax.vjp(fn, logits)
      (grad,) = vjp({"loss_sum": jnp.ones((), jnp.float32),
                     "correct": jnp.zeros((), jnp.float32),
                     "count": jnp.zeros((), jnp.float32)})
    return out, grad

  (want, grad_want), (got, grad_got) = sums("xla"), sums("pallas_interpret")
  for name in ("loss_sum", "correct", "count"):
    assert got[name].dtype == jnp.float32 and got[name].shape == ()
    assert_close(got[name], want[name], 1e-6, name)
  assert float(got["correct"]) >= 1.0  # the planted argmax target at a scored position
  assert grad_got.dtype == jnp.bfloat16  # the kernels' gradient, in the logits' dtype
  assert_close(grad_got, grad_want, 1e-2, "dlogits")
  unscored = ~np.asarray(mask)
  assert not np.any(np.asarray(grad_got)[unscored]) and not np.any(
      np.asarray(grad_want)[unscored])
  assert not np.any(np.asarray(grad_got)[..., vocab_size:])


def test_chunked_loss_same_through_both_impls():
  """The LM head and loss a chunk at a time (lax.scan over jax.checkpoint): the kernels' vjp
  inside it gives the XLA form's sums and head gradient (float32 logits)."""
  rng = np.random.default_rng(4)
  vocab_size, v_padded = 120, 128
  hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, v_padded)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab_size, (2, 7)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 7)) < 0.7)

  def loss_and_grad(impl):
    def loss(w):
      head = lambda h: h @ w
      sums = chunked_masked_loss_and_accuracy(head, hidden, targets, mask, vocab_size, 3)
      return sums["loss_sum"], sums
    with resolve_auto_as(**{OP: impl}):
      return jax.grad(loss, has_aux=True)(w)

  (grad_want, want), (grad_got, got) = loss_and_grad("xla"), loss_and_grad("pallas_interpret")
  for name in ("loss_sum", "correct", "count"):
    assert_close(got[name], want[name], 1e-6, name)
  assert_close(grad_got, grad_want, 1e-5, "head gradient")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's choice")
def test_auto_is_xla_on_cpu():
  text = jax.jit(lambda x, t: softmax_cross_entropy_with_accuracy(x, t, 8)).lower(
      jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((2,), jnp.int32)).as_text()
  assert "cross_entropy_fwd" not in text and "xla.gpu.triton" not in text
