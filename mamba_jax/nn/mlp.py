"""Gated MLP (SwiGLU): the channel-mixing layer of Transformer++ and of hybrid Mamba blocks.

Mirrors ``mamba_ssm.modules.mlp.GatedMLP``: one fused input projection ``fc1`` producing the
value and the gate side by side, a SiLU gate, and the output projection ``fc2``.

Parameters (flax ``nnx.Linear`` layout, kernels (in, out)):
  fc1.kernel (d, 2·f)   columns [0, f) are the value y, columns [f, 2·f) the gate
  fc1.bias   (2·f,)     only with bias=True
  fc2.kernel (f, d_out)
  fc2.bias   (d_out,)   only with bias=True
Letter legend: d in_features, f hidden_features, d_out out_features, "..." leading axes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.nn.init import NO_WEIGHT_DECAY, torch_default_init
from mamba_jax.nn.linear import Linear
from mamba_jax.ops.checks import check_floating, check_shape


def hidden_size(in_features: int, hidden_features: int | None, multiple_of: int) -> int:
  """int(8·in/3) when not given, then rounded up to a multiple of ``multiple_of``.

  As in ``mamba_ssm``, the rounding applies to a given ``hidden_features`` too.
  """
  if multiple_of < 1:
    raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
  hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
  return (hidden + multiple_of - 1) // multiple_of * multiple_of


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward layer (Shazeer, 2020, "GLU Variants Improve Transformer", eq. 6).

    [y, gate] = x · fc1          y, gate: (..., f)
    out = (y · silu(gate)) · fc2                    (plus the biases when bias=True)

  Initialisation as PyTorch's nn.Linear: kernels U(±1/sqrt(fan_in)); biases zero (as
  ``mamba_ssm``'s ``_init_weights`` sets them). Biases are marked ``no_weight_decay``.
  """

  def __init__(self, in_features: int, *, hidden_features: int | None = None,
               out_features: int | None = None, multiple_of: int = 128, bias: bool = False,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.hidden_features = hidden_size(in_features, hidden_features, multiple_of)
    self.out_features = out_features if out_features is not None else in_features
    self.dtype = dtype
    linear = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                  bias_metadata={NO_WEIGHT_DECAY: True}, rngs=rngs)
    self.fc1 = Linear(in_features, 2 * self.hidden_features,
                      kernel_init=torch_default_init(in_features), **linear)
    self.fc2 = Linear(self.hidden_features, self.out_features,
                      kernel_init=torch_default_init(self.hidden_features), **linear)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., d) floating -> (..., d_out) in the compute dtype."""
    check_floating("x", x)
    check_shape("x", x, (*x.shape[:-1], self.in_features), "(..., in_features)")
    with jax.named_scope("gated_mlp"):
      y, gate = jnp.split(self.fc1(x), 2, axis=-1)
      return self.fc2(y * jax.nn.silu(gate))
