"""Sequence classification on a Mamba backbone: pool the final hidden states, a linear head.

  h = MixerModel(input_ids)              (b, l, d)   final-norm hidden states (float32)
  p = mean_t h[:, t]  or  h[:, l − 1]    (b, d)      "mean" or "last" pooling
  logits = p · W + c                     (b, 1, k)   float32

The logits keep a length axis of 1 so that the training loop's masked cross-entropy (targets
(b, 1), mask (b, 1)) scores one label per sequence. The backbone is a whole
:class:`~mamba_jax.nn.lm.MambaLM` (its LM head unused; with tied embeddings it adds no
parameter), so a language model's parameters load into ``classifier.lm`` unchanged: the
pretrain-then-fine-tune recipe of the Mamba paper's DNA experiments (§4.3.4; HyenaDNA's
species classification also mean-pools).

Letter legend: b batch, l length, d d_model, k classes.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mamba_jax.config import MambaConfig
from mamba_jax.nn.init import NO_WEIGHT_DECAY, torch_default_init
from mamba_jax.nn.linear import Linear
from mamba_jax.nn.lm import MambaLM
from mamba_jax.ops.checks import check_integer, check_rank

POOLINGS = ("mean", "last")


class SequenceClassifier(nnx.Module):
  """A MambaLM backbone, pooling over the sequence, and a linear layer to ``num_classes``.

  Args:
    config: the backbone's architecture.
    num_classes: k, the number of labels (>= 2).
    pooling: "mean" over all positions or the "last" position (causal models see the whole
      sequence only there).
    dtype, param_dtype: compute and parameter dtypes (as MambaLM's).
    rngs: parameter randomness.
  """

  def __init__(self, config: MambaConfig, *, num_classes: int, pooling: str = "mean",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(num_classes, int) or num_classes < 2:
      raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    self.pooling, self.num_classes, self.dtype = pooling, num_classes, dtype
    self.lm = MambaLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head = Linear(config.d_model, num_classes, dtype=jnp.float32,
                       param_dtype=param_dtype,
                       kernel_init=torch_default_init(config.d_model),
                       bias_metadata={NO_WEIGHT_DECAY: True}, rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, remat: bool | int | float = False) -> jax.Array:
    """input_ids (b, l) int -> logits (b, 1, k) float32; ``remat`` rematerializes the
    backbone's blocks in the backward (``lm.run_blocks``)."""
    check_rank("input_ids", input_ids, 2, "(batch, length)")
    check_integer("input_ids", input_ids)
    with jax.named_scope("sequence_classifier"):
      hidden = self.lm.backbone(input_ids, remat=remat).astype(jnp.float32)
      pooled = hidden.mean(axis=1) if self.pooling == "mean" else hidden[:, -1]
      return self.head(pooled)[:, None, :]
