"""SequenceClassifier: pooled backbone states through a linear head; MambaLM unchanged."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.config import MambaConfig
from mamba_jax.nn.classifier import SequenceClassifier
from mamba_jax.nn.lm import MambaLM
from tests.numerics import assert_close

CONFIG = MambaConfig(d_model=16, n_layer=2, vocab_size=9, pad_vocab_size_multiple=8,
                     ssm_cfg={"layer": "Mamba1", "d_state": 4})


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_logits_are_the_head_of_the_pooled_hidden_states(pooling):
  model = SequenceClassifier(CONFIG, num_classes=4, pooling=pooling, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (3, 11), 0, 9)
  other_ids = ids.at[:, 0].set((ids[:, 0] + 1) % 9)
  # One compiled call (eager Mamba layers are slow on CPU).
  logits, hidden, other = nnx.jit(lambda m, a, b: (m(a), m.lm.backbone(a), m(b)))(
      model, ids, other_ids)
  assert logits.shape == (3, 1, 4) and logits.dtype == jnp.float32
  hidden = np.asarray(hidden)
  pooled = hidden.mean(axis=1) if pooling == "mean" else hidden[:, -1]
  expected = pooled @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
  assert_close(np.asarray(logits[:, 0]), expected, rtol=1e-5)
  # Both poolings see the first token (through the causal recurrence): changing it changes
  # the logits.
  assert not np.allclose(np.asarray(other), np.asarray(logits))


def test_backbone_matches_the_language_model():
  lm = MambaLM(CONFIG, rngs=nnx.Rngs(0))
  classifier = SequenceClassifier(CONFIG, num_classes=3, rngs=nnx.Rngs(0))
  lm_params = nnx.state(lm, nnx.Param)
  assert jax.tree.structure(lm_params) == jax.tree.structure(
      nnx.state(classifier.lm, nnx.Param))  # an LM checkpoint loads into .lm
  ids = jnp.arange(20, dtype=jnp.int32).reshape(2, 10) % 9
  hidden, logits = nnx.jit(lambda m, a: (m.backbone(a), m(a)))(lm, ids)
  w = lm.backbone.embedding.embedding[...]
  assert_close(np.asarray(jnp.einsum("bld,vd->blv", hidden, w)), np.asarray(logits),
               rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_classes"):
    SequenceClassifier(CONFIG, num_classes=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling"):
    SequenceClassifier(CONFIG, num_classes=2, pooling="max", rngs=nnx.Rngs(0))
