"""Mamba-2's decoding step between in_proj and the gated norm: the conv step, then the SSD step.

  z0, x0, z, xBC, dt = split_in_proj(zxbcdt)                (Mamba2Mixer's layout)
  xBC' = silu(causal_conv1d_update(xBC, conv_state))       (Mamba-2 §7, Figure 6: the conv)
  x, B, C = split_xbc(xBC')
  y, h' = ssd_state_update(h, x, dt, −exp(A_log), B, C, D, z if gate, ...)
                                                            (Mamba-2 §3.1 eq. (2), one token)

``impl="xla"`` composes those ops (the reference); ``impl="pallas"`` runs everything after
in_proj in one Pallas GPU kernel (``pallas_kernels.gpu.ssd_decode_step``, Triton lowering),
which reads the in_proj row in place; ``"pallas_interpret"`` is that kernel in the Pallas
interpreter (CPU tests). ``"auto"`` takes the kernel on GPUs, when it supports the shapes, for
batches up to ``AUTO_MAX_BATCH`` and at every batch with a 16-bit SSM state; else the XLA
form.

Layout of in_proj's output zxbcdt (mamba_ssm's order, grouped): z0, x0 (d_mlp each), then for
each of the g groups: z of its r = h / g heads (r·p), x of those heads (r·p), B (n), C (n),
dt of those heads (r). The conv's channels are each group's [x, B, C] in that order.

Shape legend: b batch, m d_mlp, c = h·p + 2·g·n, w conv width, h heads, p head_dim,
n d_state, g groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba_jax.ops.causal_conv1d import causal_conv1d_update
from mamba_jax.ops.checks import check_rank, check_shape
from mamba_jax.ops.impl import platform, resolve_impl
from mamba_jax.ops.ssd import NO_DT_LIMIT
from mamba_jax.ops.ssd_state_update import ssd_state_update
from pallas_kernels.gpu import ssd_decode_step as kernel

IMPLS = ("xla", "pallas", "pallas_interpret")
# Measured on an H100, mamba2-1.3b's decoding loop (scripts/profile_decode.py, one call each):
# batch 1, 2.16 ms per token with the kernel against 2.32 with the XLA form (439 kernels per
# token against 583); batch 128 (float32 state), 12.52 against 12.00, where the step is bound
# by the state's traffic and XLA's fusions reach more of the copy ceiling. Between them
# (scripts/bench_decode_step.py, the step alone at batch 64) the two were within 8 %. With a
# bfloat16 state the kernel is ahead at large batches too (the step alone, µs: mamba2-1.3b
# 62 against 72 at batch 64, 117 against 131 at 128; mamba2-130m 18 against 24, 48 against 58).
AUTO_MAX_BATCH = 16


def split_in_proj(zxbcdt: jax.Array, d_mlp: int, heads: int, groups: int, d_state: int):
  """(..., 2·m + 2·h·p + 2·g·n + h) -> z0, x0 (..., m), z (..., h·p) in head order, xBC
  (..., h·p + 2·g·n) in the conv's grouped channel order, dt (..., h) in head order."""
  lead, m, g, n = zxbcdt.shape[:-1], d_mlp, groups, d_state
  width = (zxbcdt.shape[-1] - 2 * m - 2 * g * n - heads) // (2 * g)  # x (or z) per group
  per_group = zxbcdt[..., 2 * m:].reshape(*lead, g, -1)  # (..., g, 2·width + 2·n + h/g)
  z = per_group[..., :width].reshape(*lead, g * width)
  xBC = per_group[..., width:2 * width + 2 * n].reshape(*lead, g * (width + 2 * n))
  dt = per_group[..., 2 * width + 2 * n:].reshape(*lead, heads)
  return zxbcdt[..., :m], zxbcdt[..., m:2 * m], z, xBC, dt


def split_xbc(xBC: jax.Array, heads: int, groups: int, d_state: int):
  """(..., c) in the grouped channel order -> x (..., h, p), B (..., g, n), C (..., g, n)."""
  lead, c = xBC.shape[:-1], xBC.shape[-1]
  width = (c - 2 * groups * d_state) // groups
  per_group = xBC.reshape(*lead, groups, width + 2 * d_state)
  x = per_group[..., :width].reshape(*lead, heads, groups * width // heads)
  return x, per_group[..., width:width + d_state], per_group[..., width + d_state:]


def ssd_decode_step(zxbcdt: jax.Array, conv_state: jax.Array, conv_weight: jax.Array,
                    conv_bias: jax.Array | None, ssm_state: jax.Array, A_log: jax.Array, *,
                    d_mlp: int, groups: int, D: jax.Array | None = None,
                    dt_bias: jax.Array | None = None, gate: bool = False,
                    dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_DT_LIMIT,
                    out_rows: int | None = None, impl: str = "auto"
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One token from in_proj's output through the conv and the SSD recurrence (the module
  docstring's equations).

  Args:
    zxbcdt: (b, 2·m + 2·h·p + 2·g·n + h) floating, in_proj's output (module docstring).
    conv_state: (b, c, w − 1) the conv's previous w − 1 inputs.
    conv_weight: (c, w). conv_bias: optional (c,).
    ssm_state: (b, h, p, n).
    A_log: (h,), A = −exp(A_log) (computed in float32 or wider).
    d_mlp: m, the width of z0 and x0 at the front of zxbcdt.
    groups: g, with h % g == 0.
    D: optional (h,) or (h, p) skip. dt_bias: optional (h,).
    gate: y ← y · silu(z) inside the step (Mamba2Mixer with rmsnorm=False).
    dt_softplus, dt_limit: as ``ssd_state_update``.
    out_rows: rows of y (>= b; default b), the extra ones zero: at batch 1 the mixer asks for
      2, so that the gated norm hands out_proj two rows, a GEMM without a pad kernel in front
      (``mamba_jax.nn.linear``).
    impl: "auto", "xla", "pallas" or "pallas_interpret".

  Returns:
    (y (out_rows, h, p) in zxbcdt's dtype, new conv_state (b, c, w − 1) in its dtype, new ssm_state
    (b, h, p, n) in its dtype). The arithmetic is float32 (float64 for float64 inputs on the
    XLA path); the kernel rounds the conv's output to zxbcdt's dtype before the SSD, as the
    composed ops do.

  Raises:
    ValueError: on malformed arguments (naming the argument), or impl="pallas" for shapes or
      dtypes the kernel does not take (saying why).
  """
  check_rank("zxbcdt", zxbcdt, 2, "(batch, d_in_proj)")
  check_rank("ssm_state", ssm_state, 4, "(batch, heads, head_dim, d_state)")
  batch, heads, head_dim, d_state = ssm_state.shape
  if not isinstance(groups, int) or groups < 1 or heads % groups:
    raise ValueError(f"groups must be a positive int dividing heads ({heads}), got {groups!r}")
  if not isinstance(d_mlp, int) or d_mlp < 0:
    raise ValueError(f"d_mlp must be an int >= 0, got {d_mlp!r}")
  check_shape("zxbcdt", zxbcdt,
              (batch, kernel.in_proj_width(d_mlp, heads, head_dim, groups, d_state)),
              "(batch, 2·d_mlp + 2·heads·head_dim + 2·groups·d_state + heads) with "
              "ssm_state's sizes")
  check_shape("A_log", A_log, (heads,), "(heads,)")
  if out_rows is None:
    out_rows = batch
  if not isinstance(out_rows, int) or out_rows < batch:
    raise ValueError(f"out_rows must be an int >= the batch ({batch}), got {out_rows!r}")
  impl = resolve_impl("ssd_decode_step", impl, IMPLS, lambda: (
      "pallas" if platform() == "gpu"
      and (batch <= AUTO_MAX_BATCH or jnp.dtype(ssm_state.dtype).itemsize == 2)
      and not kernel.check_supported(zxbcdt, conv_state, conv_weight, ssm_state) else "xla"))

  def reference(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias):
    _, _, z, xBC, dt = split_in_proj(zxbcdt, d_mlp, heads, groups, d_state)
    xBC, conv_state = causal_conv1d_update(xBC, conv_state, conv_weight, conv_bias,
                                           activation="silu", impl="xla")
    x, B, C = split_xbc(xBC, heads, groups, d_state)
    A = -jnp.exp(A_log.astype(jnp.promote_types(A_log.dtype, jnp.float32)))
    y, ssm_state = ssd_state_update(
        ssm_state, x, dt, A, B, C, D=D, z=z.reshape(batch, heads, head_dim) if gate else None,
        dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    return y, conv_state, ssm_state

  args = (zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias)
  if impl == "xla":
    y, conv_state, ssm_state = reference(*args)
    return jnp.pad(y, ((0, out_rows - batch), (0, 0), (0, 0))), conv_state, ssm_state
  jax.eval_shape(reference, *args)  # the reference's checks (traced shapes only: no compute)
  why = kernel.check_supported(zxbcdt, conv_state, conv_weight, ssm_state)
  if why:
    raise ValueError(f"ssd_decode_step impl={impl!r}: {why}; use impl='xla'")
  return kernel.ssd_decode_step_pallas(
      *args, d_mlp=d_mlp, groups=groups, gate=gate, dt_softplus=dt_softplus,
      dt_limit=(float(dt_limit[0]), float(dt_limit[1])), out_rows=out_rows,
      interpret=impl == "pallas_interpret")
