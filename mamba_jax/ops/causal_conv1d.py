"""Causal depthwise 1-D convolution: the short convolution in front of Mamba's SSM.

Mamba (Gu & Dao, 2023, §3.4, Figure 3) and Mamba-2 (Dao & Gu, 2024, §7.1) pass the
expanded input through a depthwise causal convolution of small width (typically 4) before
the selective SSM. This file holds the full-sequence form (training, prefill) and the
single-step form (decoding), both with the semantics and layouts of the ``causal-conv1d``
package that ``mamba_ssm`` calls, channels-last:

  x (b, l, e), weight (e, w), bias (e,), states (b, e, w - 1) oldest input first.

Letter legend: b batch, l length, e channels (d_inner), w conv width, s state length.
Arithmetic is in float32 (or float64 for float64 inputs); results come back in x's dtype.

The full-sequence form takes ``impl``: "xla" (below), "pallas" (the Pallas GPU kernels of
``pallas_kernels.gpu.causal_conv1d``, forward and backward, for the training path: no
``seq_idx``, no initial or final states), "pallas_interpret" (those kernels in the Pallas
interpreter) or "auto": the kernels on a GPU where they apply, else the XLA form. On an H100
at Mamba-2 130M's conv (16 × 2048 tokens, 1792 channels, bf16) XLA's form took 0.22 ms
forward and 0.93 ms forward + backward (its autodiff writes float32 copies of the whole
activation), the kernels 0.14 ms and 0.53 ms (``scripts/bench_mixer_ops.py``).

The single-step form takes ``impl``: "xla" (below), "pallas" (one Pallas GPU kernel,
``pallas_kernels.gpu.causal_conv1d_update``, for s = w − 1), "pallas_interpret" (that kernel
in the Pallas interpreter) or "auto", the XLA form on every platform: in a decoding loop XLA
fuses the step with its neighbours, and the kernel needs its input materialized (measured
with Mamba-1: ``mamba_jax.ops.selective_state_update``'s docstring). The models' decoding
steps read the conv's input in place instead: Mamba-1's in ``mamba_jax.ops.selective_decode_step``,
Mamba-2's inside its fused step kernel (``mamba_jax.ops.ssd_decode_step``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops.checks import (check_choice, check_floating, check_integer, check_rank,
                                  check_shape, is_concrete)
from mamba_jax.ops.impl import platform, resolve_impl
from pallas_kernels.gpu import causal_conv1d as sequence_kernel
from pallas_kernels.gpu import causal_conv1d_update as kernel

ACTIVATIONS = (None, "silu", "swish")


def _compute_dtype(*arrays: Optional[jax.Array]) -> jnp.dtype:
  """float32, or wider when an input is wider (float64 inputs stay float64)."""
  dtype = jnp.dtype(jnp.float32)
  for a in arrays:
    if a is not None:
      dtype = jnp.promote_types(dtype, jnp.result_type(a))
  return dtype


def _activate(y: jax.Array, activation: Optional[str]) -> jax.Array:
  return y if activation is None else jax.nn.silu(y)


def _check_weight_bias(weight: jax.Array, bias: Optional[jax.Array], dim: int) -> int:
  """Validates weight (e, w) and bias (e,) against ``dim`` channels; returns the width w."""
  check_rank("weight", weight, 2, "(dim, width)")
  check_shape("weight", weight, (dim, None), "(dim, width)")
  check_floating("weight", weight)
  width = weight.shape[1]
  if width < 1:
    raise ValueError(f"weight must have width >= 1 (shape (dim, width)), got shape "
                     f"{tuple(weight.shape)}")
  if bias is not None:
    check_shape("bias", bias, (dim,), "(dim,)")
    check_floating("bias", bias)
  return width


def causal_conv1d(
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    activation: Optional[str] = None,
    initial_states: Optional[jax.Array] = None,
    seq_idx: Optional[jax.Array] = None,
    return_final_states: bool = False,
    impl: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal depthwise convolution over the sequence axis (Mamba §3.4, Mamba-2 §7.1).

  For each channel c and position t, with w the width and x[t'] for t' < 0 taken from
  ``initial_states`` (zero when none are given):

    y[t, c] = act( bias[c] + sum_{k=0}^{w-1} weight[c, k] · x[t - (w - 1) + k, c] )

  so ``weight[c, w - 1]`` multiplies the current input. It is computed as a sum of w
  shifted, weighted copies of the (left-padded) input, which XLA fuses into one pass.

  Packed sequences: with ``seq_idx``, the input at t' contributes to the output at t only
  when ``seq_idx[t'] == seq_idx[t]``; each segment is convolved as if on its own, from zero
  history. ``initial_states`` belong to a virtual ``seq_idx`` of 0 preceding position 0:
  they feed only a first segment whose id is 0 (a first segment with another id starts
  from zeros).

  Args:
    x: (b, l, e) floating.
    weight: (e, w) floating, w >= 1 (causal-conv1d's layout; PyTorch's Conv1d weight
      (e, 1, w) with the middle axis squeezed).
    bias: optional (e,) floating.
    activation: None, or "silu" ("swish" is accepted as the same thing).
    initial_states: optional (b, e, w - 1) floating: the w - 1 inputs preceding x, oldest
      first.
    seq_idx: optional (b, l) integer, nondecreasing along l: the id of the sequence each
      position belongs to.
    return_final_states: also return the state for continuing the sequence.
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring); the kernels take
      neither ``initial_states``, ``seq_idx`` nor ``return_final_states``.

  Returns:
    y: (b, l, e) in x's dtype. With ``return_final_states``, ``(y, final_states)`` where
    final_states (b, e, w - 1), in x's dtype, holds the last w - 1 inputs oldest first
    (reaching into ``initial_states`` when l < w - 1), ready for ``causal_conv1d_update``.
    With ``seq_idx``, entries of final_states that belong to a sequence other than the
    last one (``seq_idx[:, -1]``) are zero, so that the state continues the last sequence
    exactly as if it had been convolved alone.
  """
  check_rank("x", x, 3, "(batch, length, dim)")
  check_floating("x", x)
  batch, length, dim = x.shape
  width = _check_weight_bias(weight, bias, dim)
  check_choice("activation", activation, ACTIVATIONS)
  if initial_states is not None:
    check_shape("initial_states", initial_states, (batch, dim, width - 1),
                "(batch, dim, width - 1)")
    check_floating("initial_states", initial_states)
  if seq_idx is not None:
    check_shape("seq_idx", seq_idx, (batch, length), "(batch, length)")
    check_integer("seq_idx", seq_idx)
    # numpy, not jnp: inside a trace jnp ops on a concrete array return tracers.
    if is_concrete(seq_idx) and np.any(np.diff(np.asarray(seq_idx), axis=1) < 0):
      raise ValueError("seq_idx must be nondecreasing along the length axis")

  plain = initial_states is None and seq_idx is None and not return_final_states
  impl = resolve_impl(
      "causal_conv1d", impl, ("xla", "pallas", "pallas_interpret"),
      lambda: ("pallas" if platform() == "gpu" and plain
               and not sequence_kernel.check_supported(x, weight) else "xla"))
  if impl != "xla":
    why = ("it takes neither initial_states, seq_idx nor return_final_states" if not plain
           else sequence_kernel.check_supported(x, weight))
    if why:
      raise ValueError(f"causal_conv1d impl={impl!r}: {why}; use impl='xla'")
    return sequence_kernel.causal_conv1d_pallas(x, weight, bias, activation is not None,
                                                impl == "pallas_interpret")

  dtype = _compute_dtype(x, weight, bias, initial_states)
  if initial_states is None:
    history = jnp.zeros((batch, width - 1, dim), dtype)
  else:
    history = jnp.swapaxes(initial_states, 1, 2).astype(dtype)
  xp = jnp.concatenate([history, x.astype(dtype)], axis=1)  # (b, l + w - 1, e)
  w = weight.astype(dtype)

  if seq_idx is not None:
    # The ids of the padded positions: the history belongs to the virtual sequence 0.
    seq_p = jnp.concatenate(
        [jnp.zeros((batch, width - 1), seq_idx.dtype), seq_idx], axis=1)  # (b, l + w - 1)

  y = jnp.zeros((batch, length, dim), dtype)
  for k in range(width):
    term = xp[:, k:k + length, :] * w[:, k]
    if seq_idx is not None:
      same = seq_p[:, k:k + length] == seq_idx  # (b, l)
      term = jnp.where(same[..., None], term, 0)
    y = y + term
  if bias is not None:
    y = y + bias.astype(dtype)
  y = _activate(y, activation).astype(x.dtype)
  if not return_final_states:
    return y

  final = xp[:, length:, :]  # (b, w - 1, e): the last w - 1 inputs
  if seq_idx is not None:
    same = seq_p[:, length:] == seq_idx[:, -1:]  # (b, w - 1)
    final = jnp.where(same[..., None], final, 0)
  return y, jnp.swapaxes(final, 1, 2).astype(x.dtype)


def causal_conv1d_update(
    x: jax.Array,
    conv_state: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    activation: Optional[str] = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of ``causal_conv1d`` (Mamba §3.4; the recurrent form of the conv).

  With s the state length (s >= w - 1) and the state holding the s most recent inputs,
  oldest first:

    y[c] = act( bias[c] + sum_{k=0}^{w-2} weight[c, k] · conv_state[c, s - (w - 1) + k]
                        + weight[c, w - 1] · x[c] )
    new_conv_state = [conv_state[:, :, 1:], x]   (shifted left by one, x appended)

  Stepping this over a sequence from ``initial_states`` reproduces ``causal_conv1d``, and
  the final state equals its ``final_states`` when s = w - 1.

  Args:
    x: (b, e) floating: the input at the current position.
    conv_state: (b, e, s) floating, s >= w - 1.
    weight: (e, w) floating.
    bias: optional (e,) floating.
    activation: None, or "silu" ("swish" is accepted as the same thing).
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring).

  Returns:
    (y, new_conv_state): y (b, e) in x's dtype; new_conv_state (b, e, s) in conv_state's
    dtype.

  Raises:
    ValueError: on malformed arguments, naming the argument; or impl="pallas" for arguments
      the kernel does not take (saying why).
  """
  check_rank("x", x, 2, "(batch, dim)")
  check_floating("x", x)
  batch, dim = x.shape
  width = _check_weight_bias(weight, bias, dim)
  check_choice("activation", activation, ACTIVATIONS)
  check_rank("conv_state", conv_state, 3, "(batch, dim, state_len)")
  check_shape("conv_state", conv_state, (batch, dim, None), "(batch, dim, state_len)")
  check_floating("conv_state", conv_state)
  state_len = conv_state.shape[2]
  if state_len < width - 1:
    raise ValueError(f"conv_state must have state_len >= width - 1 = {width - 1} "
                     f"(shape (batch, dim, state_len)), got shape {tuple(conv_state.shape)}")

  impl = resolve_impl("causal_conv1d_update", impl, ("xla", "pallas", "pallas_interpret"),
                      lambda: "xla")
  if impl != "xla":
    why = kernel.check_supported(x, conv_state, weight)
    if why:
      raise ValueError(f"causal_conv1d_update impl={impl!r}: {why}; use impl='xla'")
    return kernel.causal_conv1d_update_pallas(x, conv_state, weight, bias,
                                              silu=activation is not None,
                                              interpret=impl == "pallas_interpret")

  dtype = _compute_dtype(x, conv_state, weight, bias)
  window = jnp.concatenate(
      [conv_state[:, :, state_len - (width - 1):].astype(dtype),
       x[:, :, None].astype(dtype)], axis=2)  # (b, e, w)
  y = jnp.sum(window * weight.astype(dtype), axis=2)
  if bias is not None:
    y = y + bias.astype(dtype)
  y = _activate(y, activation).astype(x.dtype)

  if state_len == 0:
    return y, conv_state
  new_state = jnp.concatenate(
      [conv_state[:, :, 1:], x[:, :, None].astype(conv_state.dtype)], axis=2)
  return y, new_state
