"""The inside of a Mamba-2 mixer, from in_proj's output to out_proj's input, with the kernels
reading and writing in_proj's output in place.

Mamba-2 §7.1 (Figure 6), for one group of B/C (ngroups = 1) and no gated-MLP side branch
(d_ssm = d_inner), in_proj's output zxbcdt (b, l, 2·e + 2·n + h) has the columns
[z (e) | x (e) | B (n) | C (n) | dt (h)] (``nn.mamba2``'s layout, mamba_ssm's order), and

  xBC = silu(conv1d(zxbcdt[..., e : 2e + 2n]))                    (Pallas conv kernel)
  y   = SSD(x, dt, A, B, C) + D·x,   [x, B, C] = xBC               (``ops.ssd``, §6)
  out = gated_rms_norm(y, z) = G(y · silu(z)) · w                   (Pallas norm kernel)

The same function as the mixer's composition of ``ops.causal_conv1d``, ``ops.ssd`` and
``ops.norms.gated_rms_norm`` (and tested against it); what differs is where the bytes go.
Composed, z and xBC are slices of zxbcdt that XLA copies out for the kernels, and the gradient
of zxbcdt is assembled from the three gradients (dz, dxBC, ddt) by a pad-and-add over its
whole width: on an H100 at Mamba-2 130M (16 × 2048 tokens) about 0.4 ms a layer together.
Here the conv and norm kernels read their columns of zxbcdt in place, and the backward writes
the gradient's column blocks into one buffer: the norm's backward kernel allocates it and
writes dz, the conv's backward kernel writes dxBC into it in place (an aliased output), and
ddt goes in by an in-place ``dynamic_update_slice``.

Residuals for the backward: zxbcdt, the SSD output y, the norm's rstd, the SSD's own
residuals (its ``jax.vjp``), and the parameters; the conv's output is recomputed from zxbcdt.

Letter legend: b batch, l length, e d_ssm (= d_inner), h heads, p head_dim (e = h·p),
n d_state, c conv channels (e + 2n), w conv width, W in_proj width (2e + 2n + h).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from mamba_jax.ops.ssd import ssd
from pallas_kernels.gpu import causal_conv1d as conv_kernel
from pallas_kernels.gpu import gated_rms_norm as norm_kernel


class Mamba2InnerConfig(NamedTuple):
  """The static part of :func:`mamba2_inner`: sizes, SSD options, norm options, and how the
  SSD runs (``ops.ssd``'s impl) and whether the kernels run in the Pallas interpreter."""
  heads: int
  head_dim: int
  d_state: int
  chunk_size: int
  dt_limit: tuple[float, float]
  norm_eps: float
  norm_before_gate: bool
  ssd_impl: str = "auto"
  interpret: bool = False


def _columns(cfg: Mamba2InnerConfig) -> tuple[int, int, int]:
  """(e, c, W): z at [0, e), xBC at [e, e + c), dt at [e + c, W)."""
  e = cfg.heads * cfg.head_dim
  c = e + 2 * cfg.d_state
  return e, c, e + c + cfg.heads


def check_supported(zxbcdt: jax.Array, conv_weight: jax.Array,
                    cfg: Mamba2InnerConfig) -> str:
  """'' when :func:`mamba2_inner` takes these, else why not (the mixer then composes the ops)."""
  e, c, width = _columns(cfg)
  if zxbcdt.ndim != 3 or zxbcdt.shape[2] != width:
    return (f"zxbcdt must be (batch, length, {width}) for heads={cfg.heads}, head_dim="
            f"{cfg.head_dim}, d_state={cfg.d_state} (one group, no d_mlp), got "
            f"{zxbcdt.shape}")
  if conv_weight.shape[0] != c:
    return f"conv_weight must have {c} channels, got {conv_weight.shape}"
  rows = jax.ShapeDtypeStruct((zxbcdt.shape[0] * zxbcdt.shape[1], e), zxbcdt.dtype)
  return (conv_kernel.check_supported(zxbcdt, conv_weight)
          or norm_kernel.check_supported(rows, rows, jax.ShapeDtypeStruct((e,), jnp.float32),
                                         e))


def _ssd(cfg: Mamba2InnerConfig, x, dt, A, B, C, D, dt_bias):
  return ssd(x, dt, A, B, C, chunk_size=cfg.chunk_size, D=D, dt_bias=dt_bias,
             dt_softplus=True, dt_limit=cfg.dt_limit, impl=cfg.ssd_impl)


def _split_xbc(xbc: jax.Array, cfg: Mamba2InnerConfig):
  b, l, _ = xbc.shape
  e, n = cfg.heads * cfg.head_dim, cfg.d_state
  return (xbc[..., :e].reshape(b, l, cfg.heads, cfg.head_dim),
          xbc[..., e:e + n].reshape(b, l, 1, n), xbc[..., e + n:].reshape(b, l, 1, n))


def _forward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, cfg):
  b, l, width = zxbcdt.shape
  e, c, _ = _columns(cfg)
  xbc = conv_kernel.causal_conv1d_fwd_pallas(zxbcdt, conv_weight, conv_bias, silu=True,
                                             interpret=cfg.interpret, x_offset=e)
  x, B, C = _split_xbc(xbc, cfg)
  dt = zxbcdt[..., e + c:]
  y, ssd_vjp = jax.vjp(functools.partial(_ssd, cfg), x, dt, A, B, C, D, dt_bias)
  y = y.reshape(b * l, e)
  out, rstd = norm_kernel.gated_rms_norm_fwd(
      y, zxbcdt.reshape(b * l, width), norm_weight, group_size=e,
      norm_before_gate=cfg.norm_before_gate, eps=cfg.norm_eps, interpret=cfg.interpret,
      z_offset=0)
  residuals = (zxbcdt, conv_weight, conv_bias, norm_weight, y, rstd, ssd_vjp)
  return out.reshape(b, l, e), residuals


def _backward(cfg, residuals, dout):
  zxbcdt, conv_weight, conv_bias, norm_weight, y, rstd, ssd_vjp = residuals
  b, l, width = zxbcdt.shape
  e, c, _ = _columns(cfg)
  # dz into columns [0, e) of a new (b·l, W) buffer; the other columns follow.
  dy, grad, dnorm_weight = norm_kernel.gated_rms_norm_bwd(
      y, zxbcdt.reshape(b * l, width), norm_weight, rstd, dout.reshape(b * l, e),
      group_size=e, norm_before_gate=cfg.norm_before_gate, interpret=cfg.interpret,
      z_offset=0, dz_width=width, dz_offset=0)
  dx, ddt, dA, dB, dC, dD, ddt_bias = ssd_vjp(
      dy.reshape(b, l, cfg.heads, cfg.head_dim).astype(y.dtype))
  dxbc = jnp.concatenate([dx.reshape(b, l, e), dB.reshape(b, l, -1), dC.reshape(b, l, -1)],
                         axis=-1).astype(zxbcdt.dtype)
  grad, dconv_weight, dconv_bias = conv_kernel.causal_conv1d_bwd_pallas(
      zxbcdt, conv_weight, conv_bias, dxbc, silu=True, interpret=cfg.interpret, x_offset=e,
      dx_into=grad.reshape(b, l, width), dx_offset=e)
  grad = lax.dynamic_update_slice(grad, ddt.astype(grad.dtype), (0, 0, e + c))
  return (grad, dconv_weight.astype(conv_weight.dtype),
          None if conv_bias is None else dconv_bias.astype(conv_bias.dtype),
          ddt_bias, dA, dD, dnorm_weight.astype(norm_weight.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _mamba2_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, cfg):
  return _forward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, cfg)[0]


_mamba2_inner.defvjp(_forward, _backward)


def mamba2_inner(zxbcdt: jax.Array, conv_weight: jax.Array, conv_bias: jax.Array | None,
                 dt_bias: jax.Array, A: jax.Array, D: jax.Array, norm_weight: jax.Array,
                 cfg: Mamba2InnerConfig) -> jax.Array:
  """The module docstring's conv → SSD → gated norm on in_proj's output.

  Args:
    zxbcdt: (b, l, W) in_proj's output, columns [z | x | B | C | dt], float32/bfloat16/float16.
    conv_weight: (c, w); conv_bias: (c,) or None.
    dt_bias: (h,); A: (h,) negative (−exp(A_log)); D: (h,) or (h, p).
    norm_weight: (e,).
    cfg: sizes and options; ``check_supported`` must accept the arguments.

  Returns:
    (b, l, e) in zxbcdt's dtype: out_proj's input. Gradients for every array argument.
  """
  why = check_supported(zxbcdt, conv_weight, cfg)
  if why:
    raise ValueError(f"mamba2_inner: {why}")
  return _mamba2_inner(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, cfg)
