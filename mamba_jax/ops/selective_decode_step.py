"""Mamba-1's decoding step around its products: the conv step and the SSM step, reading their
inputs where in_proj, x_proj and dt_proj left them.

A Mamba-1 layer's step (Mamba §3.4 Figure 3, one token; ``Mamba1Mixer.step``):

  xz = in_proj(u)                              (b, e, 2): x and z channels interleaved
  x' = silu(causal_conv1d_update(xz[..., 0]))   conv_step_from_pairs
  x_dbl = x_proj(x'),  δ = x_dbl[:, :r] · W_dt  (GEMMs in the module)
  y = selective_state_update(h, x', δ, −exp(A_log), B = x_dbl[:, r:r+n],
                             C = x_dbl[:, r+n:r+2n], D, z = xz[..., 1], dt_bias, softplus)
                                                ssm_step_from_rows
  out = out_proj(y)

``impl="xla"`` slices and calls the ops (the reference); ``impl="pallas"`` runs each step as
one Pallas GPU kernel (``pallas_kernels.gpu.causal_conv1d_update`` with interleaved input,
``pallas_kernels.gpu.selective_state_update``'s packed form) that reads the slices in place —
a custom call's operands are materialized buffers, so slices passed in would each cost a
kernel (measured: with the plain kernels, mamba-1.4b's batch-1 loop ran 823 kernels per token
against XLA's 631, and was slower). ``"pallas_interpret"``: those kernels in the Pallas
interpreter. ``"auto"``: the kernels on GPUs at every batch size (measured on an H100 in the
decoding loop, ``scripts/profile_decode.py --step_impls auto,pallas`` with float32 states:
mamba-1.4b 2.34 against 2.43 ms per token at batch 1, 3.40 against 3.70 at batch 64, 4.59
against 4.92 at batch 128; mamba-130m 1.10 against 1.24 at batch 128), otherwise the XLA form.

``out_rows``: both steps return their output with at least that many rows, the rows past the
batch zero. At batch 1 the module asks for 2, so that x_proj's and out_proj's products are
two-row GEMMs without a pad kernel in front (``mamba_jax.nn.linear``).

Shape legend: b batch, e d_inner, w conv width, n d_state, r dt_rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.causal_conv1d import causal_conv1d_update
from mamba_jax.ops.checks import check_rank, check_shape
from mamba_jax.ops.impl import platform, resolve_impl
from mamba_jax.ops.selective_state_update import selective_state_update
from pallas_kernels.gpu import causal_conv1d_update as conv_kernel
from pallas_kernels.gpu import selective_state_update as ssm_kernel

IMPLS = ("xla", "pallas", "pallas_interpret")


def _pad_rows(y: jax.Array, rows: int) -> jax.Array:
  return y if y.shape[0] >= rows else jnp.pad(y, ((0, rows - y.shape[0]), (0, 0)))


def _check_out_rows(out_rows: int | None, batch: int) -> int:
  if out_rows is None:
    return batch
  if not isinstance(out_rows, int) or out_rows < batch:
    raise ValueError(f"out_rows must be an int >= the batch ({batch}), got {out_rows!r}")
  return out_rows


def conv_step_from_pairs(xz: jax.Array, conv_state: jax.Array, weight: jax.Array,
                         bias: jax.Array | None, *, out_rows: int | None = None,
                         impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """x' = silu(conv step of x = xz[..., 0]) (``causal_conv1d_update``), from in_proj's pairs.

  Args:
    xz: (b, e, 2) floating, in_proj's output viewed as (x, z) pairs.
    conv_state: (b, e, w − 1). weight: (e, w). bias: optional (e,).
    out_rows: rows of x' (>= b; default b), the extra ones zero.
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring).

  Returns:
    (x' (out_rows, e) in xz's dtype, the new conv_state (b, e, w − 1)).
  """
  check_rank("xz", xz, 3, "(batch, d_inner, 2)")
  check_shape("xz", xz, (None, None, 2), "(batch, d_inner, 2)")
  batch = xz.shape[0]
  out_rows = _check_out_rows(out_rows, batch)
  impl = resolve_impl("mamba1_conv_step", impl, IMPLS, lambda: (
      "pallas" if platform() == "gpu"
      and not conv_kernel.check_supported(xz[..., 0], conv_state, weight) else "xla"))
  if impl == "xla":
    y, new_state = causal_conv1d_update(xz[..., 0], conv_state, weight, bias,
                                        activation="silu", impl="xla")
    return _pad_rows(y, out_rows), new_state
  jax.eval_shape(lambda *a: causal_conv1d_update(*a, activation="silu", impl="xla"),
                 xz[..., 0], conv_state, weight, bias)  # the op's checks, shapes only
  why = conv_kernel.check_supported(xz[..., 0], conv_state, weight)
  if why:
    raise ValueError(f"conv_step_from_pairs impl={impl!r}: {why}; use impl='xla'")
  return conv_kernel.causal_conv1d_update_pallas(xz, conv_state, weight, bias, silu=True,
                                                 out_rows=out_rows,
                                                 interpret=impl == "pallas_interpret")


def ssm_step_from_rows(state: jax.Array, x: jax.Array, dt: jax.Array, x_dbl: jax.Array,
                       xz: jax.Array, A_log: jax.Array, D: jax.Array, dt_bias: jax.Array, *,
                       dt_rank: int, out_rows: int | None = None,
                       impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Mamba-1's SSM step (``selective_state_update`` with dt_softplus) from the layer's rows.

  Args:
    state: (b, e, n) real.
    x: (rows >= b, e) the conv's output; dt: (rows >= b, e) dt_proj's product before its bias.
    x_dbl: (rows >= b, r + 2n) x_proj's output: [δ_low, B, C].
    xz: (b, e, 2) in_proj's (x, z) pairs: the gate is xz[..., 1].
    A_log: (e, n), A = −exp(A_log). D, dt_bias: (e,).
    dt_rank: r.
    out_rows: rows of out (>= b; default b), the extra ones zero.
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring).

  Returns:
    (out (out_rows, e) in x's dtype, the new state (b, e, n) in state's dtype).
  """
  check_rank("state", state, 3, "(batch, d_inner, d_state)")
  batch, d_inner, n = state.shape
  for name, a, width in (("x", x, d_inner), ("dt", dt, d_inner),
                         ("x_dbl", x_dbl, dt_rank + 2 * n)):
    check_rank(name, a, 2, f"(rows >= batch, {width})")
    if a.shape[0] < batch or a.shape[1] != width:
      raise ValueError(f"{name} must have shape (rows >= {batch}, {width}), got {a.shape}")
  check_shape("xz", xz, (batch, d_inner, 2), "(batch, d_inner, 2)")
  out_rows = _check_out_rows(out_rows, batch)
  impl = resolve_impl("mamba1_ssm_step", impl, IMPLS, lambda: (
      "pallas" if platform() == "gpu"
      and not ssm_kernel.check_supported(state, x, A_log, 1) else "xla"))

  def reference(state, x, dt, x_dbl, xz, A_log, D, dt_bias):
    A = -jnp.exp(A_log.astype(jnp.promote_types(A_log.dtype, jnp.float32)))
    B, C = x_dbl[:batch, dt_rank:dt_rank + n], x_dbl[:batch, dt_rank + n:dt_rank + 2 * n]
    return selective_state_update(state, x[:batch], dt[:batch], A, B, C, D=D, z=xz[..., 1],
                                  dt_bias=dt_bias, dt_softplus=True, impl="xla")

  args = (state, x, dt, x_dbl, xz, A_log, D, dt_bias)
  if impl == "xla":
    y, new_state = reference(*args)
    return _pad_rows(y, out_rows), new_state
  jax.eval_shape(reference, *args)  # the op's checks, shapes only
  why = ssm_kernel.check_supported(state, x, A_log, 1)
  if why:
    raise ValueError(f"ssm_step_from_rows impl={impl!r}: {why}; use impl='xla'")
  return ssm_kernel.selective_state_update_packed_pallas(
      *args, dt_rank=dt_rank, out_rows=out_rows, interpret=impl == "pallas_interpret")
