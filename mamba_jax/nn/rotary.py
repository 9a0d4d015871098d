"""Rotary position embeddings (RoPE) for the attention layers.

RoFormer (Su et al., 2021, §3.4.2, eq. 34) rotates each pair of query/key channels by an
angle proportional to the position, so that the query-key dot product depends on the
positions only through their offset. The layout and frequencies follow ``flash_attn``'s
``RotaryEmbedding`` that ``mamba_ssm``'s ``MHA`` uses, so converted checkpoints line up:

  inv_freq[i] = base^(-2i / r),   i = 0 .. r/2 - 1,   angle[t, i] = t · inv_freq[i]

and only the first r = rotary_dim channels of each head are rotated; the rest pass through.
Two pairings of the rotated channels:
  non-interleaved (GPT-NeoX, the default): channel i pairs with channel i + r/2;
  interleaved (GPT-J):                     channel 2i pairs with channel 2i + 1.
Each pair (a, b) becomes (a·cos − b·sin, a·sin + b·cos).

Letter legend: b batch, l length, h heads, p head_dim, r rotary_dim.
The angles and the rotation are computed in float32 (float64 for float64 inputs); the
result comes back in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import check_floating, check_integer, check_rank, check_shape


def inverse_frequencies(rotary_dim: int, base: float, dtype=jnp.float32) -> jax.Array:
  """(r/2,) frequencies base^(-2i / r) of RoFormer eq. 34 (θ_i in the paper)."""
  return 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim))


def apply_rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int,
                 base: float = 10000.0, interleaved: bool = False) -> jax.Array:
  """Rotates the first ``rotary_dim`` channels of every head by position (RoFormer eq. 34).

  For a pair (a, b) of channels paired as described in the module docstring and position t:

    a' = a · cos(t · θ_i) − b · sin(t · θ_i)
    b' = a · sin(t · θ_i) + b · cos(t · θ_i)

  Args:
    x: (b, l, h, p) floating queries or keys.
    positions: (b, l) or (l,) integer positions of the tokens.
    rotary_dim: r, even, 0 < r <= p.
    base: the frequency base (10000 in RoFormer).
    interleaved: GPT-J pairing (2i, 2i + 1) instead of GPT-NeoX's (i, i + r/2).

  Returns:
    (b, l, h, p) in x's dtype.
  """
  check_rank("x", x, 4, "(batch, length, heads, head_dim)")
  check_floating("x", x)
  batch, length, _, head_dim = x.shape
  check_integer("positions", positions)
  check_rank("positions", positions, (1, 2), "(batch, length) or (length,)")
  if positions.ndim == 1:
    check_shape("positions", positions, (length,), "(length,)")
    positions = jnp.broadcast_to(positions, (batch, length))
  else:
    check_shape("positions", positions, (batch, length), "(batch, length)")
  if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
    raise ValueError(f"rotary_dim={rotary_dim} must be even and in (0, head_dim={head_dim}]")

  dtype = jnp.promote_types(x.dtype, jnp.float32)
  angles = positions.astype(dtype)[..., None] * inverse_frequencies(rotary_dim, base, dtype)
  cos = jnp.cos(angles)[:, :, None, :]  # (b, l, 1, r/2)
  sin = jnp.sin(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(dtype), x[..., rotary_dim:]
  if interleaved:
    a, b = rot[..., 0::2], rot[..., 1::2]
    rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
  else:
    a, b = jnp.split(rot, 2, axis=-1)
    rot = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)
