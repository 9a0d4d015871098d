"""Token masks (padding) for the recurrent mixers: pads must never touch a state.

A token mask m (b, l) holds 1 at the tokens of a row and 0 at its pads, in any layout (left
padding, right padding, pads anywhere). A mixer given a mask computes, at the tokens of every
row, exactly what it computes for that row's tokens alone (in order, continuing from its
initial state), and returns the state after the row's last token. Two facts make that cheap:

* The SSM: a step with Δ = 0 leaves the state unchanged, h_t = exp(0·A) h_{t−1} + 0·B_t x_t =
  h_{t−1} (Mamba §2 eq. (4); Mamba-2 eq. (1) with A_t = exp(Δ_t A)), so the scan only needs
  Δ masked to 0 at pads.
* The short causal conv (Mamba §3.4) looks w − 1 positions back, so pads inside the window
  would be seen. :func:`left_align` moves each row's tokens to its end (pads first, tokens in
  order); then :func:`causal_conv1d_after_pads` places the row's history (the conv state it
  continues from, zeros for a fresh sequence) right before its first token, where the pads
  were, so that every token's window holds exactly its real predecessors.

The mixers left-align their input, run with these two rules, and put the outputs back in the
input's layout (zero at pads).

Letter legend: b batch, l length, c channels, w conv width, s = w − 1 conv state length.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops.causal_conv1d import causal_conv1d
from mamba_jax.ops.checks import check_rank, check_shape, is_concrete


def check_token_mask(name: str, mask: Any, batch: int, length: int) -> None:
  """Raises unless ``mask`` is a (b, l) bool/integer array of 0 (pad) and 1 (token)."""
  check_rank(name, mask, 2, "(batch, length)")
  check_shape(name, mask, (batch, length), "(batch, length)")
  dtype = jnp.result_type(mask)
  if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    raise ValueError(f"{name} must be bool or integer (1 token, 0 pad), got {dtype}")
  if is_concrete(mask):
    values = np.asarray(mask)
    if not np.all((values == 0) | (values == 1)):
      raise ValueError(f"{name} must hold only 0 (pad) and 1 (token)")


def left_align(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The permutation that moves every row's tokens to its end, pads first, both in order.

  Args:
    mask: (b, l) token mask.

  Returns:
    order (b, l) int32: aligned[:, j] = x[:, order[:, j]];
    inverse (b, l) int32: x[:, t] = aligned[:, inverse[:, t]];
    num_pads (b,) int32: the aligned row holds pads at [0, num_pads) and tokens after.
  """
  tokens = mask.astype(jnp.int32)
  order = jnp.argsort(tokens, axis=1, stable=True).astype(jnp.int32)
  inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
  num_pads = (mask.shape[1] - jnp.sum(tokens, axis=1)).astype(jnp.int32)
  return order, inverse, num_pads


def take_along_length(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (b, l, ...) gathered along the length axis: out[:, j] = x[:, index[:, j]]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def token_positions(num_pads: jax.Array, length: int) -> jax.Array:
  """(b, l) bool: True at the tokens of a left-aligned row with ``num_pads`` pads first."""
  return jnp.arange(length, dtype=jnp.int32)[None, :] >= num_pads[:, None]


def causal_conv1d_after_pads(x: jax.Array, weight: jax.Array, bias: Optional[jax.Array],
                             num_pads: jax.Array, *, activation: Optional[str] = None,
                             initial_states: Optional[jax.Array] = None,
                             return_final_states: bool = False):
  """``causal_conv1d`` of left-aligned rows whose pads must not enter any token's window.

  Row r of x is num_pads[r] pads then its tokens. The conv runs on the sequence
  [history, tokens] of each row, history being its initial state (w − 1 inputs, oldest first;
  zeros when None): the history is moved from before position 0 to just before the row's
  first token (over the pads), so a token's output is the same as with the row unpadded.
  Outputs at pads are meaningless. The final state is the last w − 1 inputs of
  [history, tokens] (the history itself for a row of pads only).

  Args:
    x: (b, l, c) floating, left-aligned.
    weight: (c, w); bias: (c,) or None; activation: None or "silu".
    num_pads: (b,) int, 0 <= num_pads <= l.
    initial_states: (b, c, w − 1) or None.
    return_final_states: also return the final states (b, c, w − 1).

  Returns:
    (b, l, c) in x's dtype [, (b, c, w − 1)].
  """
  check_rank("x", x, 3, "(batch, length, channels)")
  batch, length, channels = x.shape
  check_shape("num_pads", num_pads, (batch,), "(batch,)")
  s = weight.shape[-1] - 1
  if initial_states is None:
    history = jnp.zeros((batch, s, channels), x.dtype)
  else:
    check_shape("initial_states", initial_states, (batch, channels, s),
                "(batch, channels, width - 1)")
    history = jnp.swapaxes(initial_states, 1, 2).astype(x.dtype)
  z = jnp.concatenate([history, x], axis=1)  # (b, s + l, c)
  j = jnp.arange(s + length, dtype=jnp.int32)[None, :]
  p = num_pads.astype(jnp.int32)[:, None]
  # History index j − p over [p, p + s); tokens stay where they are; zeros before.
  source = jnp.where(j < p + s, j - p, j)
  moved = take_along_length(z, jnp.clip(source, 0, s + length - 1))
  moved = jnp.where((j >= p)[..., None], moved, jnp.zeros((), x.dtype))
  states = jnp.swapaxes(moved[:, :s], 1, 2)
  return causal_conv1d(moved[:, s:], weight, bias, activation=activation,
                       initial_states=states, return_final_states=return_final_states)
