"""Pallas GPU cross-entropy kernels against ``ops.cross_entropy``'s XLA form in float64.

The GPU class runs the compiled kernels (Triton lowering) on an NVIDIA GPU; its interpret twin
runs the same checks in the Pallas interpreter on CPU with small vocabularies and tiny tiles
(several row blocks, several vocabulary tiles, the last ones partial). The oracle is the XLA
form (optax, jnp.argmax) on the same logits upcast to float64: loss, lse, correct (exactly),
and the gradient with respect to the logits for a random loss cotangent. A separate test lowers
the kernels to Triton IR for an H100 without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.cross_entropy import softmax_cross_entropy_with_accuracy
from pallas_kernels.gpu.cross_entropy import (BACKWARD_BLOCKS, FORWARD_BLOCKS,
                                              CrossEntropyBlocks, cross_entropy_bwd,
                                              cross_entropy_fwd)
from tests.numerics import assert_close

# Norm-relative, against float64 on the same (upcast) logits. loss and lse are float32 sums of
# exactly represented inputs whatever their dtype (interpreter: <= 6e-8); dlogits is rounded to
# the logits' dtype (interpreter: bfloat16 1.6e-3, float32 1.3e-7).
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
PADDING_VALUE = 1e4  # raw value of the padding columns: above every real logit


def _inputs(seed, rows, v_padded, vocab_size, dtype):
  """(logits (rows, v_padded), targets (rows,) int32, dloss (rows,) float32).

  The padding columns hold a value above every real logit (they must still lose the argmax
  and get no probability). Ties for the maximum: row 0 has its maximum at columns 1 and
  vocab_size − 1 (two tiles apart when there are several) with the later one the target
  (wrong), row 1 the same with the earlier one the target (right). Otherwise every other
  row's target is its argmax, the rest random.
  """
  rng = np.random.default_rng([seed, rows, v_padded, vocab_size])
  logits = 3.0 * rng.standard_normal((rows, v_padded))
  logits[:, vocab_size:] = PADDING_VALUE
  logits = np.array(jnp.asarray(logits, dtype).astype(jnp.float64))  # rounded to dtype
  real = logits[:, :vocab_size]
  targets = rng.integers(0, vocab_size, rows)
  targets[::2] = real[::2].argmax(axis=1)
  for row, target in ((0, vocab_size - 1), (1, 1)):
    if row < rows and vocab_size > 2:
      logits[row, [1, vocab_size - 1]] = real[row].max() + 1.0
      targets[row] = target
  dloss = rng.standard_normal(rows)
  return (jnp.asarray(logits, dtype), jnp.asarray(targets, jnp.int32),
          jnp.asarray(dloss, jnp.float32))


def _reference(logits, targets, vocab_size, dloss):
  """(loss, lse, correct, dlogits) of the XLA form in float64."""
  x = logits.astype(jnp.float64)
  (loss, correct), vjp = jax.vjp(
      lambda x: softmax_cross_entropy_with_accuracy(x, targets, vocab_size, impl="xla"), x)
  masked = jnp.where(jnp.arange(x.shape[1]) < vocab_size, x, -jnp.inf)
  lse = jax.nn.logsumexp(masked, axis=1)
  (dlogits,) = vjp((dloss.astype(jnp.float64), jnp.zeros_like(correct)))
  return loss, lse, correct, dlogits


class CrossEntropyCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below."""
  INTERPRET = False

  def check(self, rows, v_padded, vocab_size, dtype, fwd_blocks=FORWARD_BLOCKS,
            bwd_blocks=BACKWARD_BLOCKS, seed=0):
    logits, targets, dloss = _inputs(seed, rows, v_padded, vocab_size, dtype)
    loss, lse, correct = cross_entropy_fwd(logits, targets, vocab_size=vocab_size,
                                           interpret=self.INTERPRET, blocks=fwd_blocks)
    dlogits = cross_entropy_bwd(logits, targets, lse, dloss, vocab_size=vocab_size,
                                interpret=self.INTERPRET, blocks=bwd_blocks)
    loss_ref, lse_ref, correct_ref, dlogits_ref = _reference(logits, targets, vocab_size,
                                                             dloss)
    what = f"{rows}x{v_padded} V={vocab_size} {jnp.dtype(dtype).name}"
    for name, value in (("loss", loss), ("lse", lse), ("correct", correct)):
      assert value.shape == (rows,) and value.dtype == jnp.float32, f"{what} {name}"
    assert_close(loss, loss_ref, LOSS_TOLERANCE, f"{what} loss")
    assert_close(lse, lse_ref, LOSS_TOLERANCE, f"{what} lse")
    np.testing.assert_array_equal(correct, correct_ref, err_msg=f"{what} correct")
    if rows > 1 and vocab_size > 2:
      assert correct[:2].tolist() == [0.0, 1.0], f"{what}: ties go to the first index"
    assert dlogits.shape == logits.shape and dlogits.dtype == logits.dtype
    assert_close(dlogits, dlogits_ref, GRAD_TOLERANCES[dtype], f"{what} dlogits")
    assert not np.any(np.asarray(dlogits[:, vocab_size:])), f"{what}: padding gradient"

  def check_op(self, shape, vocab_size, dtype, impl):
    """The op's custom_vjp (leading axes, default tiles) against its XLA form in float64."""
    rows, v_padded = int(np.prod(shape[:-1])), shape[-1]
    logits, targets, dloss = _inputs(1, rows, v_padded, vocab_size, dtype)
    logits, targets = logits.reshape(shape), targets.reshape(shape[:-1])
    dloss = dloss.reshape(shape[:-1])
    run = lambda impl: lambda x: softmax_cross_entropy_with_accuracy(x, targets, vocab_size,
                                                                     impl=impl)
    (loss, correct), vjp = jax.vjp(run(impl), logits)
    (loss_ref, correct_ref), vjp_ref = jax.vjp(run("xla"), logits.astype(jnp.float64))
    assert loss.shape == correct.shape == shape[:-1]
    assert_close(loss, loss_ref, LOSS_TOLERANCE, "loss")
    np.testing.assert_array_equal(correct, correct_ref)
    (dlogits,) = vjp((dloss, jnp.zeros_like(correct)))
    (dlogits_ref,) = vjp_ref((dloss.astype(jnp.float64), jnp.zeros_like(correct_ref)))
    assert dlogits.dtype == logits.dtype
    assert_close(dlogits, dlogits_ref, GRAD_TOLERANCES[dtype], "dlogits")


@pytest.mark.gpu
class TestCrossEntropyGPU(CrossEntropyCases):

  # (rows, v_padded, vocab_size): Mamba-2 130M's head (50277 padded to 50288) at an odd row
  # count; one row; a vocabulary of one partial tile, unpadded.
  @pytest.mark.parametrize("rows,v_padded,vocab_size", [
      (2047, 50288, 50277), (1, 50288, 50277), (130, 1000, 1000)])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_matches_xla(self, rows, v_padded, vocab_size, dtype):
    self.check(rows, v_padded, vocab_size, dtype)

  def test_several_rows_per_program(self):
    blocks = CrossEntropyBlocks(block_rows=4, block_cols=1024, num_warps=4, num_stages=2)
    self.check(37, 5003, 4999, jnp.bfloat16, blocks, blocks)

  def test_op_with_leading_axes(self):
    self.check_op((2, 300, 50288), 50277, jnp.bfloat16, "pallas")

  def test_auto_picks_the_kernels(self):
    text = jax.jit(jax.grad(lambda x, t: softmax_cross_entropy_with_accuracy(x, t, 60)[0].sum())
                   ).lower(jnp.zeros((2, 8, 64), jnp.bfloat16),
                           jnp.zeros((2, 8), jnp.int32)).as_text()
    assert "cross_entropy_fwd" in text and "cross_entropy_bwd" in text


class TestCrossEntropyInterpret(CrossEntropyCases):
  """The kernels in the Pallas interpreter on CPU, tiles of 64 columns."""
  INTERPRET = True
  BLOCKS = CrossEntropyBlocks(block_rows=4, block_cols=64, num_warps=4, num_stages=1)

  @pytest.mark.parametrize("rows,v_padded,vocab_size,dtype", [
      (37, 300, 290, jnp.float32),    # 10 row blocks, 5 tiles of 64 (the last partial)
      (37, 300, 290, jnp.bfloat16),
      (1, 300, 256, jnp.float32),     # one row; V ends on a tile boundary, padding after it
      (130, 200, 200, jnp.bfloat16),  # no padding; v_padded not a multiple of the tile
      (3, 60, 50, jnp.float32),       # one tile: the tied maxima in the same tile
  ])
  def test_matches_xla(self, rows, v_padded, vocab_size, dtype):
    self.check(rows, v_padded, vocab_size, dtype, self.BLOCKS, self.BLOCKS)

  def test_row_blocks_of_one(self):
    blocks = CrossEntropyBlocks(block_rows=1, block_cols=128, num_warps=4, num_stages=1)
    self.check(5, 1000, 997, jnp.bfloat16, blocks, blocks)

  def test_minus_inf_logits(self):
    """A row whose first tile is all −inf (the running maximum stays −inf for a step) and a
    −inf target logit (infinite loss) match the XLA form."""
    logits, targets, dloss = _inputs(2, 3, 300, 290, jnp.float32)
    logits = logits.at[0, :64].set(-jnp.inf).at[1, 7].set(-jnp.inf)
    targets = targets.at[1].set(7)
    loss, lse, correct = cross_entropy_fwd(logits, targets, vocab_size=290, interpret=True,
                                           blocks=self.BLOCKS)
    dlogits = cross_entropy_bwd(logits, targets, lse, dloss, vocab_size=290, interpret=True,
                                blocks=self.BLOCKS)
    loss_ref, lse_ref, correct_ref, dlogits_ref = _reference(logits, targets, 290, dloss)
    assert float(loss[1]) == np.inf == float(loss_ref[1])
    assert_close(loss[::2], loss_ref[::2], LOSS_TOLERANCE, "loss")
    assert_close(lse, lse_ref, LOSS_TOLERANCE, "lse")
    np.testing.assert_array_equal(correct, correct_ref)
    assert_close(dlogits[::2], dlogits_ref[::2], GRAD_TOLERANCES[jnp.float32], "dlogits")

  def test_op_with_leading_axes(self):
    self.check_op((2, 3, 300), 290, jnp.bfloat16, "pallas_interpret")


def test_lowers_to_triton():
  """Forward and backward kernels lower to Triton IR for an H100 (no GPU): Mamba-2 130M's
  head (50277 tokens padded to 50288) at 16 × 2048 positions in bfloat16."""
  S = jax.ShapeDtypeStruct

  def loss_and_grad(logits, targets):
    return jax.value_and_grad(lambda x: softmax_cross_entropy_with_accuracy(
        x, targets, 50277, impl="pallas")[0].sum())(logits)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(loss_and_grad).trace(S((16, 2048, 50288), jnp.bfloat16),
                                        S((16, 2048), jnp.int32)).lower(
                                            lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2


@pytest.mark.parametrize("blocks,match", [
    (CrossEntropyBlocks(3, 64, 4, 1), "block_rows must be a power of two"),
    (CrossEntropyBlocks(4, 96, 4, 1), "block_cols must be a power of two"),
])
def test_tiles_must_be_powers_of_two(blocks, match):
  with pytest.raises(ValueError, match=match):
    cross_entropy_fwd(jnp.zeros((4, 100), jnp.float32), jnp.zeros((4,), jnp.int32),
                      vocab_size=100, interpret=True, blocks=blocks)


def test_no_rows():
  loss, lse, correct = cross_entropy_fwd(jnp.zeros((0, 100), jnp.bfloat16),
                                         jnp.zeros((0,), jnp.int32), vocab_size=90,
                                         interpret=True)
  assert loss.shape == lse.shape == correct.shape == (0,)
  dlogits = cross_entropy_bwd(jnp.zeros((0, 100), jnp.bfloat16), jnp.zeros((0,), jnp.int32),
                              lse, loss, vocab_size=90, interpret=True)
  assert dlogits.shape == (0, 100) and dlogits.dtype == jnp.bfloat16
