"""Mamba-2's decoding step between in_proj and the gated norm: the conv step, then the SSD step.

  xBC' = silu(causal_conv1d_update(xBC, conv_state))       (Mamba-2 §7, Figure 6: the conv)
  x, B, C = split(xBC')                                     (grouped channel order)
  y, h' = ssd_state_update(h, x, dt, A, B, C, D, z, ...)   (Mamba-2 §3.1 eq. (2), one token)

``impl="xla"`` composes the two ops (the reference); ``impl="pallas"`` runs both in one Pallas
GPU kernel (``pallas_kernels.gpu.ssd_decode_step``, Triton lowering), which at batch 1 replaces
about five small XLA kernels per layer; ``"pallas_interpret"`` is that kernel in the Pallas
interpreter (CPU tests). ``"auto"`` takes the kernel on GPUs when it supports the shapes.

Channel order of xBC (``Mamba2Mixer``'s grouped layout): for each of the g groups, the x
channels of its r = h / g heads (r·p), then its B (n), then its C (n).

Shape legend: b batch, c = h·p + 2·g·n, w conv width, h heads, p head_dim, n d_state, g groups.
"""

from __future__ import annotations

import jax

from mamba_jax.ops.causal_conv1d import causal_conv1d_update
from mamba_jax.ops.checks import check_rank, check_shape
from mamba_jax.ops.impl import platform, resolve_impl
from mamba_jax.ops.ssd import NO_DT_LIMIT
from mamba_jax.ops.ssd_state_update import ssd_state_update
from pallas_kernels.gpu import ssd_decode_step as kernel

IMPLS = ("xla", "pallas", "pallas_interpret")


def split_xbc(xBC: jax.Array, heads: int, groups: int, d_state: int):
  """(..., c) in the grouped channel order -> x (..., h, p), B (..., g, n), C (..., g, n)."""
  lead, c = xBC.shape[:-1], xBC.shape[-1]
  width = (c - 2 * groups * d_state) // groups
  per_group = xBC.reshape(*lead, groups, width + 2 * d_state)
  x = per_group[..., :width].reshape(*lead, heads, groups * width // heads)
  return x, per_group[..., width:width + d_state], per_group[..., width + d_state:]


def ssd_decode_step(xBC: jax.Array, conv_state: jax.Array, conv_weight: jax.Array,
                    conv_bias: jax.Array | None, ssm_state: jax.Array, dt: jax.Array,
                    A: jax.Array, *, groups: int, D: jax.Array | None = None,
                    z: jax.Array | None = None, dt_bias: jax.Array | None = None,
                    dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                    impl: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token through the conv and the SSD recurrence (the module docstring's equations).

  Args:
    xBC: (b, c) floating, in_proj's x, B, C before the conv, in the grouped channel order.
    conv_state: (b, c, w − 1) the conv's previous w − 1 inputs.
    conv_weight: (c, w). conv_bias: optional (c,).
    ssm_state: (b, h, p, n).
    dt: (b, h) raw step sizes. A: (h,), <= 0.
    groups: g, with h % g == 0 and c = h·p + 2·g·n.
    D: optional (h,) or (h, p) skip. z: optional (b, h, p) gate. dt_bias: optional (h,).
    dt_softplus, dt_limit: as ``ssd_state_update``.
    impl: "auto", "xla", "pallas" or "pallas_interpret".

  Returns:
    (y (b, h, p) in xBC's dtype, new conv_state (b, c, w − 1) in its dtype, new ssm_state
    (b, h, p, n) in its dtype). The arithmetic is float32 (float64 for float64 inputs on the
    XLA path); the kernel rounds the conv's output to xBC's dtype before the SSD, as the
    composed ops do.

  Raises:
    ValueError: on malformed arguments (naming the argument), or impl="pallas" for shapes or
      dtypes the kernel does not take (saying why).
  """
  check_rank("xBC", xBC, 2, "(batch, channels)")
  check_rank("ssm_state", ssm_state, 4, "(batch, heads, head_dim, d_state)")
  batch, heads, head_dim, d_state = ssm_state.shape
  if not isinstance(groups, int) or groups < 1 or heads % groups:
    raise ValueError(f"groups must be a positive int dividing heads ({heads}), got {groups!r}")
  channels = heads * head_dim + 2 * groups * d_state
  check_shape("xBC", xBC, (batch, channels),
              "(batch, heads·head_dim + 2·groups·d_state) with ssm_state's sizes")
  impl = resolve_impl("ssd_decode_step", impl, IMPLS, lambda: _auto(
      xBC, conv_state, conv_weight, ssm_state, groups))
  if impl == "xla":
    xBC, conv_state = causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias,
                                           activation="silu", impl="xla")
    x, B, C = split_xbc(xBC, heads, groups, d_state)
    y, ssm_state = ssd_state_update(ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                    dt_softplus=dt_softplus, dt_limit=dt_limit)
    return y, conv_state, ssm_state
  # The kernel path validates with the reference's checks (traced shapes only: no compute).
  jax.eval_shape(lambda *a: ssd_decode_step(*a, groups=groups, D=D, z=z, dt_bias=dt_bias,
                                            dt_softplus=dt_softplus, dt_limit=dt_limit,
                                            impl="xla"),
                 xBC, conv_state, conv_weight, conv_bias, ssm_state, dt, A)
  why = kernel.check_supported(xBC, conv_state, conv_weight, ssm_state, groups)
  if why:
    raise ValueError(f"ssd_decode_step impl={impl!r}: {why}; use impl='xla'")
  return kernel.ssd_decode_step_pallas(
      xBC, conv_state, conv_weight, conv_bias, ssm_state, dt, A, D, z, dt_bias, groups=groups,
      dt_softplus=dt_softplus, dt_limit=(float(dt_limit[0]), float(dt_limit[1])),
      interpret=impl == "pallas_interpret")


def _auto(xBC, conv_state, conv_weight, ssm_state, groups) -> str:
  if platform() != "gpu":
    return "xla"
  return "xla" if kernel.check_supported(xBC, conv_state, conv_weight, ssm_state,
                                         groups) else "pallas"
