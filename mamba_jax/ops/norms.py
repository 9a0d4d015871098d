"""Normalisation layers as pure functions: RMSNorm, LayerNorm and Mamba-2's gated RMSNorm.

Mamba blocks are pre-norm residual blocks (Mamba §3.4) normalised with RMSNorm (Zhang &
Sennrich, 2019) or LayerNorm (Ba et al., 2016); Mamba-2 adds a gated, grouped RMSNorm
before the output projection (Mamba-2 §7.1, "extra normalization"), ``RMSNormGated`` in
``mamba_ssm``. The statistics are taken in float32 (float64 for float64 inputs) and the
result comes back in x's dtype.

The gated norm takes ``impl``: "xla" (below), "pallas" (the Pallas GPU kernels of
``pallas_kernels.gpu.gated_rms_norm``, forward and backward: the backward saves only rstd and
writes no float32 (rows, d) tensor), "pallas_interpret" (those kernels in the Pallas
interpreter) or "auto": the kernels on a GPU where they apply, else the XLA form.

Letter legend: d the normalised (last) axis, g groups, "..." any leading axes.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import check_divisible, check_floating, check_rank, check_shape
from mamba_jax.ops.impl import platform, resolve_impl
from pallas_kernels.gpu import gated_rms_norm as kernel


def _compute_dtype(*arrays: Optional[jax.Array]) -> jnp.dtype:
  """float32, or wider when an input is wider (float64 inputs stay float64)."""
  dtype = jnp.dtype(jnp.float32)
  for a in arrays:
    if a is not None:
      dtype = jnp.promote_types(dtype, jnp.result_type(a))
  return dtype


def _check_common(x: jax.Array, weight: jax.Array, eps: float) -> int:
  """Validates x (..., d), weight (d,) and eps; returns d."""
  check_rank("x", x, range(1, 64), "(..., d)")
  check_floating("x", x)
  d = x.shape[-1]
  check_shape("weight", weight, (d,), "(d,) with d = x.shape[-1]")
  check_floating("weight", weight)
  if not isinstance(eps, numbers.Real) or eps < 0:
    raise ValueError(f"eps must be a non-negative number, got {eps!r}")
  return d


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-5) -> jax.Array:
  """RMSNorm (Zhang & Sennrich, 2019, eq. 4), as used between Mamba blocks (Mamba §3.4).

    y = x · rsqrt(mean_d(x²) + eps) · weight

  Args:
    x: (..., d) floating.
    weight: (d,) floating.
    eps: added to the mean square.

  Returns:
    (..., d) in x's dtype.
  """
  _check_common(x, weight, eps)
  dtype = _compute_dtype(x, weight)
  xf = x.astype(dtype)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (xf * rstd * weight.astype(dtype)).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: Optional[jax.Array] = None,
               eps: float = 1e-5) -> jax.Array:
  """LayerNorm (Ba et al., 2016, eq. 4) over the last axis.

    y = (x - mean_d(x)) · rsqrt(var_d(x) + eps) · weight + bias

  with the biased variance var_d(x) = mean_d((x - mean_d(x))²).

  Args:
    x: (..., d) floating.
    weight: (d,) floating.
    bias: optional (d,) floating.
    eps: added to the variance.

  Returns:
    (..., d) in x's dtype.
  """
  d = _check_common(x, weight, eps)
  if bias is not None:
    check_shape("bias", bias, (d,), "(d,) with d = x.shape[-1]")
    check_floating("bias", bias)
  dtype = _compute_dtype(x, weight, bias)
  xf = x.astype(dtype)
  centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  y = centred * rstd * weight.astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.astype(x.dtype)


def gated_rms_norm(x: jax.Array, z: Optional[jax.Array], weight: jax.Array,
                   group_size: Optional[int] = None, norm_before_gate: bool = False,
                   eps: float = 1e-5, impl: str = "auto") -> jax.Array:
  """Gated, grouped RMSNorm of Mamba-2 (§7.1; ``mamba_ssm``'s ``RMSNormGated``).

  With G(x) the RMSNorm applied to each group of ``group_size`` consecutive channels
  separately, x_j · rsqrt(mean_{i in group(j)} x_i² + eps):

    norm_before_gate=False:  y = G(x · silu(z)) · weight       (Mamba-2's choice)
    norm_before_gate=True:   y = G(x) · weight · silu(z)

  and y = G(x) · weight when z is None. Mamba-2 uses group_size = d_ssm / ngroups so that
  the norm does not mix heads of different B/C groups (which keeps tensor parallelism
  exact).

  Args:
    x: (..., d) floating.
    z: optional (..., d) floating gate, same shape as x.
    weight: (d,) floating.
    group_size: the size of each group; must divide d. None means one group of d.
    norm_before_gate: see above.
    eps: added to each group's mean square.
    impl: "auto", "xla", "pallas" or "pallas_interpret" (module docstring).

  Returns:
    (..., d) in x's dtype.
  """
  d = _check_common(x, weight, eps)
  if z is not None:
    check_shape("z", z, x.shape, "(..., d), the shape of x")
    check_floating("z", z)
  if group_size is None:
    group_size = d
  if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool):
    raise ValueError(f"group_size must be an int or None, got {group_size!r}")
  group_size = int(group_size)
  check_divisible("d (x.shape[-1])", d, "group_size", group_size)

  impl = resolve_impl(
      "gated_rms_norm", impl, ("xla", "pallas", "pallas_interpret"),
      lambda: ("pallas" if platform() == "gpu"
               and not kernel.check_supported(x, z, weight, group_size) else "xla"))
  if impl != "xla":
    why = kernel.check_supported(x, z, weight, group_size)
    if why:
      raise ValueError(f"gated_rms_norm impl={impl!r}: {why}; use impl='xla'")
    return kernel.gated_rms_norm_pallas(x, z, weight, group_size=group_size,
                                        norm_before_gate=norm_before_gate, eps=eps,
                                        interpret=impl == "pallas_interpret")

  dtype = _compute_dtype(x, z, weight)
  xf = x.astype(dtype)
  gate = None if z is None else jax.nn.silu(z.astype(dtype))
  if gate is not None and not norm_before_gate:
    xf = xf * gate
  grouped = xf.reshape(*x.shape[:-1], d // group_size, group_size)  # (..., g, d / g)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)
  y = (grouped * rstd).reshape(x.shape) * weight.astype(dtype)
  if gate is not None and norm_before_gate:
    y = y * gate
  return y.astype(x.dtype)
