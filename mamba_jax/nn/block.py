"""The residual block of every Mamba / Mamba-2 / hybrid / Transformer++ language model.

``mamba_ssm.modules.block.Block``: a pre-norm residual block (Mamba §3.4, "interleaved with
standard normalization and residual connections"; Xiong et al., 2020) written, as mamba_ssm
does for its fused add+norm kernel, as "add, then norm, then mixer", carrying the residual
stream separately from the branch output:

  residual = hidden + residual             (hidden alone in the first block)
  hidden = mixer(norm(residual))
  with an MLP (d_intermediate > 0):
    residual = hidden + residual
    hidden = mlp(norm2(residual))
  returns (hidden, residual)

so that the usual x_{i+1} = x_i + mixer(norm(x_i)) is residual + hidden after the block. This
is the semantics of mamba_ssm's fused path (``layer_norm_fn(..., prenorm=True)``), used by
all its released models. The sums are taken in float32 (or wider); with
``residual_in_fp32`` the residual stream stays float32, otherwise it is rounded to the
compute dtype as mamba_ssm stores it.

Parameters: ``norm`` (and ``norm2`` with an MLP): :class:`Norm`, ``weight`` (d,) [``bias``
(d,) for LayerNorm], ones / zeros, not weight-decayed; ``mixer``; ``mlp``.

Letter legend: b batch, l length, d d_model.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.nn.attention import Attention
from mamba_jax.nn.init import NO_WEIGHT_DECAY
from mamba_jax.ops.norms import layer_norm, rms_norm


class Norm(nnx.Module):
  """RMSNorm (Zhang & Sennrich, 2019) or LayerNorm (Ba et al., 2016) over the last axis.

    RMSNorm:   y = x / √(mean(x²) + eps) ⊙ weight
    LayerNorm: y = (x − mean(x)) / √(var(x) + eps) ⊙ weight + bias

  x (..., d) -> (..., d) in x's dtype, statistics in float32 (``mamba_jax.ops.norms``).
  weight (d,) = 1 and bias (d,) = 0 (LayerNorm only), both ``no_weight_decay``.
  """

  def __init__(self, dim: int, *, rms: bool = True, eps: float = 1e-5,
               param_dtype: Any = jnp.float32):
    self.rms, self.eps = rms, eps
    no_wd = {NO_WEIGHT_DECAY: True}
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **no_wd)
    self.bias = None if rms else nnx.Param(jnp.zeros((dim,), param_dtype), **no_wd)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.rms:
      return rms_norm(x, self.weight[...], eps=self.eps)
    return layer_norm(x, self.weight[...], self.bias[...], eps=self.eps)


class Block(nnx.Module):
  """Pre-norm residual block (mamba_ssm ``Block``): the module docstring's equations.

  Args:
    d_model: residual width d.
    mixer: the sequence mixer (Mamba1Mixer, Mamba2Mixer, H3Mixer, SSMNoGate, Attention).
    mlp: optional channel mixer (GatedMLP); adds ``norm2``.
    rms_norm: RMSNorm (True) or LayerNorm (False).
    norm_epsilon: the norms' epsilon.
    residual_in_fp32: keep the residual stream in float32.
    dtype: compute dtype of the branch inputs (the normalised hidden states).
    param_dtype: dtype of the norm parameters.
  """

  def __init__(self, d_model: int, mixer: nnx.Module, mlp: Optional[nnx.Module] = None, *,
               rms_norm: bool = True, norm_epsilon: float = 1e-5,
               residual_in_fp32: bool = True, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    self.d_model, self.residual_in_fp32, self.dtype = d_model, residual_in_fp32, dtype
    norm = dict(rms=rms_norm, eps=norm_epsilon, param_dtype=param_dtype)
    self.norm = Norm(d_model, **norm)
    self.mixer = mixer
    self.norm2 = Norm(d_model, **norm) if mlp is not None else None
    self.mlp = mlp

  @property
  def is_attention(self) -> bool:
    return isinstance(self.mixer, Attention)

  def _add_norm(self, hidden: jax.Array, residual: Optional[jax.Array],
                norm: Norm) -> tuple[jax.Array, jax.Array]:
    """(norm(hidden + residual) in dtype, hidden + residual in the residual dtype)."""
    acc = jnp.promote_types(jnp.promote_types(hidden.dtype, self.dtype), jnp.float32)
    total = hidden.astype(acc)
    if residual is not None:
      total = total + residual.astype(acc)
    normed = norm(total).astype(self.dtype)
    residual_dtype = acc if self.residual_in_fp32 else jnp.promote_types(hidden.dtype,
                                                                          self.dtype)
    return normed, total.astype(residual_dtype)

  def _mlp(self, hidden: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.mlp is None:
      return hidden, residual
    normed, residual = self._add_norm(hidden, residual, self.norm2)
    return self.mlp(normed), residual

  def init_state(self, batch: int, max_length: int, dtype: Any = None,
                 state_dtype: Any = None) -> Any:
    """The mixer's empty decoding state (a KV cache of max_length slots for attention);
    ``state_dtype``: the SSM state's storage dtype (SSM mixers; a KV cache ignores it)."""
    if self.is_attention:
      return self.mixer.init_state(batch, max_length, dtype)
    return self.mixer.init_state(batch, dtype, state_dtype)

  def __call__(self, hidden: jax.Array, residual: Optional[jax.Array] = None, *,
               initial_state: Any = None, seq_idx: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, return_state: bool = False,
               max_length: Optional[int] = None):
    """hidden (b, l, d), residual (b, l, d) or None -> (hidden, residual) [, mixer state].

    ``initial_state`` / ``seq_idx`` / ``mask`` / ``return_state`` go to the mixer;
    ``max_length`` is the KV-cache length of an attention mixer's prefill (ignored by SSM
    mixers). ``mask`` (b, l), 1 token / 0 pad: the mixer's state never sees pads (see the
    mixers); the norms and the MLP act per position, so the block's outputs at a row's
    tokens are those of its tokens alone.
    """
    with jax.named_scope("block"):
      normed, residual = self._add_norm(hidden, residual, self.norm)
      kwargs = dict(initial_state=initial_state, seq_idx=seq_idx, return_state=return_state)
      if mask is not None:
        kwargs["mask"] = mask
      if self.is_attention and return_state and initial_state is None:
        kwargs["max_length"] = max_length
      out = self.mixer(normed, **kwargs)
      hidden, state = out if return_state else (out, None)
      hidden, residual = self._mlp(hidden, residual)
    return (hidden, residual, state) if return_state else (hidden, residual)

  def step(self, hidden: jax.Array, residual: Optional[jax.Array], state: Any):
    """One token: hidden (b, d), residual (b, d) or None, the mixer state ->
    (hidden, residual, new state)."""
    with jax.named_scope("block_step"):
      normed, residual = self._add_norm(hidden, residual, self.norm)
      hidden, state = self.mixer.step(normed, state)
      hidden, residual = self._mlp(hidden, residual)
    return hidden, residual, state
