"""Rotary position embeddings (RoPE, and xPos's decaying variant) for the attention layers.

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


def xpos_zeta(rotary_dim: int, gamma: float = 0.4, dtype=jnp.float32) -> jax.Array:
  """(r/2,) xPos decay rates ζ_i = (2i/r + γ)/(1 + γ) ∈ (0, 1] (Sun et al., 2022, §3).

  ``gamma = inf`` gives ζ_i = 1 (no decay: plain RoPE).
  """
  if gamma == float("inf"):
    return jnp.ones((rotary_dim // 2,), dtype)
  if not gamma > 0:
    raise ValueError(f"xpos gamma must be > 0 (the paper uses 0.4), got gamma={gamma}")
  return (jnp.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim + gamma) / (1.0 + gamma)


def apply_xpos(x: jax.Array, positions: jax.Array, *, rotary_dim: int, downscale: bool,
               reference: jax.Array | int = 0, base: float = 10000.0,
               interleaved: bool = False, scale_base: float = 512.0,
               gamma: float = 0.4) -> jax.Array:
  """xPos: RoPE times a per-pair exponential scale (Sun et al., 2022, "A Length-
  Extrapolatable Transformer", §3; torchscale's ``XPOS`` conventions).

  The query at position n and the key at position m are

    q'_n = rope(q_n, n) · ζ^((n − c)/scale_base)          (downscale=False)
    k'_m = rope(k_m, m) · ζ^((c − m)/scale_base)          (downscale=True)

  with ζ_i = (2i/r + γ)/(1 + γ) applied to both channels of rotary pair i (the pairing of
  :func:`apply_rotary`), so that for each pair

    q'_n · k'_m = ζ^((n − m)/scale_base) · rope(q_n, n) · rope(k_m, m),

  a decay in the offset n − m (ζ < 1) on top of RoPE's rotation. The paper's scales are
  ζ^(n/scale_base) and ζ^(−m/scale_base) (reference c = 0); their product does not depend
  on the reference c, which only keeps the factors finite: ζ^(−m/512) ≈ e^(1.25·m/512)
  overflows float32 from m ≈ 36 000 on (γ = 0.4, ζ_0 = 2/7). Callers pass the largest
  query position as c (per batch row), so every key factor with m ≤ c is ζ^((c − m)/512)
  ≤ 1 (it may underflow to 0 for far keys, where the true weight is below float32's range
  anyway) and every query factor is ζ^(−(c − n)/512) ≥ 1, bounded by the span of the
  queries of one call, not by the absolute position (a decoding step at c = n has query
  factor 1 at any position). Exponents are clipped to ≤ 0 for the keys (c − m < 0, keys
  after every query, which a causal mask hides) and ≥ 0 for the queries, so no factor
  exceeds 1 except a query's ζ^(−(c − n)/512).

  ``gamma = inf`` or ``scale_base = inf`` turns the scale off: the result is
  :func:`apply_rotary`'s.

  Args:
    x: (b, l, h, p) floating queries (downscale=False) or keys (downscale=True).
    positions: (b, l) or (l,) integer positions n (or m) of the tokens.
    rotary_dim: r, even, 0 < r <= p; channels beyond r pass through unscaled.
    downscale: False for queries (ζ^((n − c)/scale_base)), True for keys
      (ζ^((c − m)/scale_base)).
    reference: c, an integer scalar or (b,) per batch row.
    base, interleaved: the rotation's, as :func:`apply_rotary`.
    scale_base: 512 in the paper; > 0.
    gamma: γ, 0.4 in the paper; > 0.

  Returns:
    (b, l, h, p) in x's dtype.
  """
  rotated = apply_rotary(x, positions, rotary_dim=rotary_dim, base=base,
                         interleaved=interleaved)
  batch, length = x.shape[:2]
  scale = xpos_scale(jnp.broadcast_to(positions, (batch, length)), reference,
                     rotary_dim=rotary_dim, downscale=downscale, interleaved=interleaved,
                     scale_base=scale_base, gamma=gamma,
                     dtype=jnp.promote_types(x.dtype, jnp.float32))
  return apply_xpos_scale(rotated, scale)


def xpos_scale(positions: jax.Array, reference: jax.Array | int, *, rotary_dim: int,
               downscale: bool, interleaved: bool = False, scale_base: float = 512.0,
               gamma: float = 0.4, dtype=jnp.float32) -> jax.Array:
  """The (b, l, 1, r) factors of :func:`apply_xpos`: ζ^(∓max(c − t, 0)/scale_base).

  positions: (b, l) integer t; reference: () or (b,) integer c; downscale: keys (True,
  factors ≤ 1) or queries (False, factors ≥ 1). Each ζ_i is repeated for both channels of
  rotary pair i, in the pairing of ``interleaved``.
  """
  if not scale_base > 0:
    raise ValueError(f"xpos scale_base must be > 0 (the paper uses 512), got {scale_base}")
  check_integer("positions", positions)
  check_rank("positions", positions, 2, "(batch, length)")
  batch = positions.shape[0]
  reference = jnp.asarray(reference)
  check_integer("reference", reference)
  check_rank("reference", reference, (0, 1), "() or (batch,)")
  if reference.ndim == 1:
    check_shape("reference", reference, (batch,), "(batch,)")
  offset = (jnp.broadcast_to(reference, (batch,))[:, None] - positions).astype(dtype)
  offset = jnp.maximum(offset, 0.0)  # keys after c (masked) get 1, never more
  exponent = (offset if downscale else -offset) / scale_base  # (b, l)
  log_zeta = jnp.log(xpos_zeta(rotary_dim, gamma, dtype))  # (r/2,), ≤ 0
  scale = jnp.exp(exponent[..., None] * log_zeta)  # (b, l, r/2)
  scale = (jnp.repeat(scale, 2, axis=-1) if interleaved
           else jnp.concatenate([scale, scale], axis=-1))
  return scale[:, :, None, :]


def apply_xpos_scale(rotated: jax.Array, scale: jax.Array) -> jax.Array:
  """Multiplies the first r channels of (b, l, h, p) ``rotated`` by (b, l, 1, r) ``scale``."""
  r = scale.shape[-1]
  rot = (rotated[..., :r].astype(scale.dtype) * scale).astype(rotated.dtype)
  return jnp.concatenate([rot, rotated[..., r:]], axis=-1)
