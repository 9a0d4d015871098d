"""The Mamba-2 mixer (Dao & Gu, 2024, §7, Figure 6): projections, short conv, SSD, gated norm.

Mirrors ``mamba_ssm.modules.mamba2.Mamba2`` option for option and parameter for parameter:

  [z0, x0, z, xBC, dt] = u · in_proj                  one fused projection (§7.1)
  xBC = silu(conv1d(xBC)),   [x, B, C] = xBC           causal depthwise conv over x, B, C
  y = SSD(x, dt, A, B, C) + D·x                        §6, heads of head_dim p, scalar A
  y = gated_rms_norm(y, z)     (rmsnorm=True)          §7.1 "extra normalization"
    or y · silu(z) inside the SSD (rmsnorm=False)
  y = [silu(z0) · x0, y]       (only when d_ssm < d_inner: a gated-MLP side branch)
  out = y · out_proj

Parameters (kernels in flax's (in, out) layout; mamba_ssm's PyTorch weights are (out, in)):
  in_proj.kernel  (d, 2·e + 2·g·n + h)  columns [z0 | x0 | group 0 | ... | group g−1], each
                  group j = [z_j | x_j | B_j | C_j | dt_j] (width k = 2·(h/g)·p + 2·n + h/g):
                  z_j, x_j, dt_j those of the h/g heads of group j (heads j·h/g, ...), B_j,
                  C_j its n columns; z0, x0 of width e − e_ssm (absent when d_ssm = d_inner)
  in_proj.bias    (2·e + 2·g·n + h,)    only with bias=True, columns as the kernel's
  conv1d.kernel   (c, w)                c = e_ssm + 2·g·n channels [x_j | B_j | C_j] group
                                        after group; PyTorch's Conv1d weight (c, 1, w) with the
                                        middle axis squeezed; kernel[:, w-1] takes the current
                                        token
  conv1d.bias     (c,)                  only with conv_bias=True
  dt_bias (h,), A_log (h,), D (h,) or (e_ssm,) with D_has_hdim
  norm.weight     (e_ssm,)              only with rmsnorm=True
  out_proj.kernel (e, d), out_proj.bias (d,) only with bias=True

Grouped layout. mamba_ssm orders in_proj's columns [z0, x0, z, x, B, C, dt] and the conv's
channels [x, B, C]; here they are stored group by group (the same values, permuted: see
:func:`mamba_ssm_order`, which ``mamba_jax.convert`` applies on reading and writing
mamba_ssm / HF checkpoints). A contiguous split of the column (channel) axis into t equal
parts, t dividing g, then gives each part whole groups: the z, x, B, C, dt columns of its
own heads (Mamba-2 §8's column-parallel in_proj), so tensor parallelism stores 1/t of
in_proj and of the conv per device with no communication inside the mixer. With ngroups = 1
the grouped order is mamba_ssm's own.

Decoding state (:class:`Mamba2State`): ``conv_state`` (b, c, w − 1), the last w − 1 inputs
of the conv (channels in the conv's grouped order), oldest first, in the compute dtype;
``ssm_state`` (b, h, p, n) in float32 (float64 for a float64 compute dtype), or in the
``state_dtype`` given to :meth:`~Mamba2Mixer.init_state` (storage only: each step reads it
into float32, updates, and rounds the new state back to the stored dtype).

Letter legend: b batch, l length, d d_model, e d_inner = expand·d, e_ssm d_ssm, h heads,
p head_dim, n d_state, g ngroups, c conv channels, w conv width.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mamba_jax.nn.init import (NO_WEIGHT_DECAY, dt_bias_init, torch_default_init,
                               uniform_A_log)
from mamba_jax.nn.linear import Linear
from mamba_jax.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from mamba_jax.ops.checks import (check_divisible, check_float_dtype, check_floating,
                                  check_rank, check_shape)
from mamba_jax.ops.impl import platform, resolve_impl
from mamba_jax.ops.mamba2_inner import Mamba2InnerConfig, mamba2_inner
from mamba_jax.ops.mamba2_inner import check_supported as inner_supported
from mamba_jax.ops.norms import gated_rms_norm
from mamba_jax.ops.padding import (check_token_mask, causal_conv1d_after_pads, left_align,
                                   take_along_length, token_positions)
from mamba_jax.ops.ssd import NO_DT_LIMIT, preprocess_dt, ssd
from mamba_jax.ops.ssd_decode_step import split_in_proj, split_xbc, ssd_decode_step


@struct.dataclass
class Mamba2State:
  """The recurrent state of one Mamba-2 layer after some prefix of the sequence.

  conv_state: (b, c, w − 1) the conv's last w − 1 inputs (x, B, C before the conv).
  ssm_state: (b, h, p, n) the SSD state h_t of Mamba-2 eq. (1), float32 (or float64).
  """
  conv_state: jax.Array
  ssm_state: jax.Array


def mamba_ssm_order(*, d_mlp: int, d_ssm: int, ngroups: int, d_state: int,
                    nheads: int) -> tuple[np.ndarray, np.ndarray]:
  """Where each in_proj column and conv channel of the grouped layout sits in mamba_ssm's.

  mamba_ssm: in_proj columns [z0 (m) | x0 (m) | z (s) | x (s) | B (g·n) | C (g·n) | dt (h)],
  conv channels [x (s) | B (g·n) | C (g·n)]. Ours (module docstring): [z0 | x0 | group 0 |
  ... | group g−1] with group j = [z_j | x_j | B_j | C_j | dt_j], and conv channels
  [x_j | B_j | C_j] for j = 0 .. g−1, where z_j, x_j are the (h/g)·p columns of heads
  j·h/g .. (j+1)·h/g − 1 (head i reads group i // (h/g), Mamba-2 §7.2), dt_j their h/g.

  Returns:
    (in_proj_index (2·m + 2·s + 2·g·n + h,), conv_index (s + 2·g·n,)) int64, permutations
    with ``ours = theirs[..., index]`` along the column / channel axis; the inverse is
    ``theirs = ours[..., np.argsort(index)]``.
  """
  check_divisible("nheads", nheads, "ngroups", ngroups)
  check_divisible("d_ssm", d_ssm, "nheads", nheads)
  m, s, g, n, h = d_mlp, d_ssm, ngroups, d_state, nheads
  width = s // g  # the x (or z) columns of one group's heads
  hg = h // g
  z_at, x_at, b_at = 2 * m, 2 * m + s, 2 * m + 2 * s
  c_at, dt_at = b_at + g * n, b_at + 2 * g * n
  columns, channels = [np.arange(2 * m)], []
  for j in range(g):
    x_j = x_at + j * width + np.arange(width)
    b_j, c_j = b_at + j * n + np.arange(n), c_at + j * n + np.arange(n)
    columns += [z_at + j * width + np.arange(width), x_j, b_j, c_j,
                dt_at + j * hg + np.arange(hg)]
    channels += [x_j - x_at, b_j - x_at, c_j - x_at]
  return (np.concatenate(columns).astype(np.int64),
          np.concatenate(channels).astype(np.int64))


def _uniform_init(bound: float):
  def init(key: jax.Array, shape, dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound).astype(dtype)
  return init


class CausalConv1d(nnx.Module):
  """Parameters of a causal depthwise conv, applied with ``mamba_jax.ops.causal_conv1d``.

  kernel (c, w): ``causal-conv1d``'s layout (PyTorch Conv1d weight (c, 1, w), squeezed).
  bias (c,). Init as PyTorch's Conv1d with groups = c: U(±1/√w) for both, or the kernel
  U(±init_range) when given (``conv_init`` of mamba_ssm). The bias is not weight-decayed.
  """

  def __init__(self, channels: int, width: int, *, use_bias: bool = True,
               init_range: Optional[float] = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if width < 1:
      raise ValueError(f"conv width must be >= 1, got d_conv={width}")
    self.channels, self.width = channels, width
    kernel_init = (torch_default_init(width) if init_range is None
                   else _uniform_init(init_range))
    self.kernel = nnx.Param(kernel_init(rngs.params(), (channels, width), param_dtype))
    self.bias = (nnx.Param(torch_default_init(width)(rngs.params(), (channels,), param_dtype),
                           **{NO_WEIGHT_DECAY: True}) if use_bias else None)

  def bias_value(self) -> Optional[jax.Array]:
    return None if self.bias is None else self.bias[...]

  def __call__(self, x: jax.Array, *, activation: Optional[str] = None,
               initial_states: Optional[jax.Array] = None,
               seq_idx: Optional[jax.Array] = None, return_final_states: bool = False,
               num_pads: Optional[jax.Array] = None):
    """x (b, l, c) -> (b, l, c) [and final states (b, c, w − 1)]; see ``ops.causal_conv1d``.

    ``num_pads`` (b,): x is left-aligned, num_pads pads then tokens per row, and the pads
    must stay out of the tokens' windows (``ops.padding.causal_conv1d_after_pads``).
    """
    if num_pads is not None:
      if seq_idx is not None:
        raise ValueError("num_pads (a token mask) cannot be combined with seq_idx")
      return causal_conv1d_after_pads(x, self.kernel[...], self.bias_value(), num_pads,
                                      activation=activation, initial_states=initial_states,
                                      return_final_states=return_final_states)
    return causal_conv1d(x, self.kernel[...], self.bias_value(), activation=activation,
                         initial_states=initial_states, seq_idx=seq_idx,
                         return_final_states=return_final_states)

  def step(self, x_t: jax.Array, conv_state: jax.Array, *,
           activation: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
    """x_t (b, c), conv_state (b, c, s) -> (y_t (b, c), new_conv_state (b, c, s))."""
    return causal_conv1d_update(x_t, conv_state, self.kernel[...], self.bias_value(),
                                activation=activation)


class RMSNormGated(nnx.Module):
  """Parameters of Mamba-2's gated grouped RMSNorm (``ops.norms.gated_rms_norm``).

  weight (e_ssm,) initialised to ones, not weight-decayed.
  """

  def __init__(self, dim: int, *, group_size: int, norm_before_gate: bool, eps: float = 1e-5,
               param_dtype: Any = jnp.float32):
    check_divisible("d_ssm", dim, "group_size", group_size)
    self.group_size, self.norm_before_gate, self.eps = group_size, norm_before_gate, eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **{NO_WEIGHT_DECAY: True})

  def __call__(self, x: jax.Array, z: Optional[jax.Array], impl: str = "auto") -> jax.Array:
    return gated_rms_norm(x, z, self.weight[...], group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate, eps=self.eps, impl=impl)


class Mamba2Mixer(nnx.Module):
  """Mamba-2 mixer (Mamba-2 §7, Figure 6 right): the equations of the module docstring.

  The SSD recurrence per head, with Δ_t = clip(softplus(dt_t + dt_bias), dt_limit) and
  scalar A = −exp(A_log) (Mamba-2 §3 and §6, eq. (1) with A_t = exp(Δ_t·A)·I):

    h_t = exp(Δ_t·A) · h_{t−1} + Δ_t · x_t ⊗ B_t,    y_t = h_t · C_t + D · x_t

  Initialisation as mamba_ssm: softplus(dt_bias) log-uniform in [dt_min, dt_max] floored at
  dt_init_floor; A ~ U(A_init_range) per head (A_log = log A, float32 arithmetic); D = 1;
  norm weight 1; conv as PyTorch (or U(±conv_init)); Linear kernels U(±1/√fan_in), biases 0.
  The LM rescales ``out_proj`` by 1/√(n_residuals·n_layer) (mamba_ssm's ``_init_weights``).
  A_log, D, dt_bias, the norm weight and all biases carry ``no_weight_decay``.

  Arithmetic: in_proj/out_proj in ``dtype``; conv, SSD and norm in float32 (float64 for a
  float64 ``dtype``) with parameters kept in ``param_dtype``; activations come back in dtype.
  """

  def __init__(self, d_model: int, *, d_state: int = 128, d_conv: int = 4,
               conv_init: Optional[float] = None, expand: int = 2, headdim: int = 64,
               d_ssm: Optional[int] = None, ngroups: int = 1,
               A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False,
               rmsnorm: bool = True, norm_before_gate: bool = False, dt_min: float = 0.001,
               dt_max: float = 0.1, dt_init_floor: float = 1e-4,
               dt_limit: tuple[float, float] = (0.0, float("inf")), bias: bool = False,
               conv_bias: bool = True, chunk_size: int = 256, layer_idx: Optional[int] = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
    self.d_inner = expand * d_model
    self.d_ssm = self.d_inner if d_ssm is None else d_ssm
    if not 0 < self.d_ssm <= self.d_inner:
      raise ValueError(f"d_ssm={self.d_ssm} must be in (0, d_inner={self.d_inner}]")
    check_divisible("d_ssm", self.d_ssm, "headdim", headdim)
    self.headdim, self.ngroups = headdim, ngroups
    self.nheads = self.d_ssm // headdim
    check_divisible("nheads (d_ssm / headdim)", self.nheads, "ngroups", ngroups)
    self.d_mlp = self.d_inner - self.d_ssm
    self.conv_dim = self.d_ssm + 2 * ngroups * d_state
    self.D_has_hdim, self.rmsnorm = D_has_hdim, rmsnorm
    self.dt_limit = tuple(dt_limit)
    self.chunk_size, self.layer_idx = chunk_size, layer_idx
    self.dtype, self.param_dtype = dtype, param_dtype

    d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
    no_wd = {NO_WEIGHT_DECAY: True}
    self.in_proj = Linear(d_model, d_in_proj, use_bias=bias, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=torch_default_init(d_model),
                          bias_metadata=no_wd, rngs=rngs)
    self.conv1d = CausalConv1d(self.conv_dim, d_conv, use_bias=conv_bias, init_range=conv_init,
                               param_dtype=param_dtype, rngs=rngs)
    self.dt_bias = nnx.Param(
        dt_bias_init(rngs.params(), (self.nheads,), dt_min, dt_max, dt_init_floor, param_dtype),
        **no_wd)
    self.A_log = nnx.Param(
        uniform_A_log(rngs.params(), (self.nheads,), tuple(A_init_range), param_dtype), **no_wd)
    self.D = nnx.Param(jnp.ones((self.d_ssm if D_has_hdim else self.nheads,), param_dtype),
                       **no_wd)
    self.norm = (RMSNormGated(self.d_ssm, group_size=self.d_ssm // ngroups,
                              norm_before_gate=norm_before_gate, param_dtype=param_dtype)
                 if rmsnorm else None)
    self.out_proj = Linear(self.d_inner, d_model, use_bias=bias, dtype=dtype,
                           param_dtype=param_dtype,
                           kernel_init=torch_default_init(self.d_inner),
                           bias_metadata=no_wd, rngs=rngs)

  def _ssm_dtype(self, dtype: Any) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)

  def _A(self) -> jax.Array:
    """A = −exp(A_log), (h,), in float32 (or wider): fp16/bf16 A_log must not overflow."""
    a_log = self.A_log[...]
    return -jnp.exp(a_log.astype(self._ssm_dtype(a_log.dtype)))

  def _D(self) -> jax.Array:
    """D as (h, p) with D_has_hdim, else (h,)."""
    d = self.D[...]
    return d.reshape(self.nheads, self.headdim) if self.D_has_hdim else d

  def mamba_ssm_order(self) -> tuple[np.ndarray, np.ndarray]:
    """This mixer's (in_proj_index, conv_index): see the module function
    :func:`mamba_ssm_order` (``ours = theirs[..., index]``)."""
    return mamba_ssm_order(d_mlp=self.d_mlp, d_ssm=self.d_ssm, ngroups=self.ngroups,
                           d_state=self.d_state, nheads=self.nheads)

  def _split(self, zxbcdt: jax.Array):
    """in_proj's output in the grouped layout [..., d_in_proj] -> z0, x0 (..., e − e_ssm),
    z (..., e_ssm) in head order, xBC (..., c) in the conv's grouped channel order, dt
    (..., h) in head order (``ops.ssd_decode_step.split_in_proj``)."""
    return split_in_proj(zxbcdt, self.d_mlp, self.nheads, self.ngroups, self.d_state)

  def _split_conv(self, xBC: jax.Array):
    """The conv's output in grouped channel order (..., c) -> x (..., h, p), B (..., g, n),
    C (..., g, n)."""
    return split_xbc(xBC, self.nheads, self.ngroups, self.d_state)

  def _output(self, y: jax.Array, z: jax.Array, z0: jax.Array, x0: jax.Array,
              norm_impl: str = "auto") -> jax.Array:
    """Gated norm, the d_mlp side branch and out_proj; y, z (..., e_ssm) -> (..., d).

    ``norm_impl``: ``ops.norms.gated_rms_norm``'s impl ("auto": its Pallas kernels on a GPU).
    """
    if self.rmsnorm:
      y = self.norm(y, z, impl=norm_impl)
    if self.d_mlp > 0:
      y = jnp.concatenate([jax.nn.silu(z0) * x0, y.astype(x0.dtype)], axis=-1)
    return self.out_proj(y)

  def _inner(self, zxbcdt: jax.Array) -> Optional[jax.Array]:
    """conv → SSD → gated norm by ``ops.mamba2_inner`` (kernels reading and writing in_proj's
    output in place), or None where it does not apply: it needs one group, no d_mlp, the gated
    norm and a GPU ("auto"; ``impl.resolve_auto_as(mamba2_inner=...)`` picks "composed",
    "pallas" or, on CPU, "pallas_interpret" with the chunked SSD)."""
    if self.ngroups != 1 or self.d_mlp or not self.rmsnorm:
      return None
    cfg = Mamba2InnerConfig(
        heads=self.nheads, head_dim=self.headdim, d_state=self.d_state,
        chunk_size=self.chunk_size, dt_limit=self.dt_limit, norm_eps=self.norm.eps,
        norm_before_gate=self.norm.norm_before_gate)
    weight = self.conv1d.kernel[...]
    impl = resolve_impl("mamba2_inner", "auto", ("composed", "pallas", "pallas_interpret"),
                        lambda: ("pallas" if platform() == "gpu"
                                 and not inner_supported(zxbcdt, weight, cfg)
                                 else "composed"))
    if impl == "composed":
      return None
    if impl == "pallas_interpret":
      cfg = cfg._replace(ssd_impl="chunked", interpret=True)
    return mamba2_inner(zxbcdt, weight, self.conv1d.bias_value(), self.dt_bias[...],
                        self._A(), self._D(), self.norm.weight[...], cfg)

  def init_state(self, batch: int, dtype: Any = None, state_dtype: Any = None
                 ) -> Mamba2State:
    """Zero state: conv_state (b, c, w − 1) in dtype (the compute dtype by default) and
    ssm_state (b, h, p, n) in state_dtype, by default float32 (float64 when dtype is
    float64). A narrower state_dtype (e.g. bfloat16, as mamba_ssm's cache for a bf16 model)
    only changes storage: :meth:`step` computes in float32 and rounds on write."""
    dtype = self.dtype if dtype is None else dtype
    ssm_dtype = (self._ssm_dtype(dtype) if state_dtype is None
                 else check_float_dtype("state_dtype", state_dtype))
    return Mamba2State(
        conv_state=jnp.zeros((batch, self.conv_dim, self.d_conv - 1), dtype),
        ssm_state=jnp.zeros((batch, self.nheads, self.headdim, self.d_state), ssm_dtype))

  def _check_state(self, state: Mamba2State, batch: int) -> None:
    if not isinstance(state, Mamba2State):
      raise ValueError(f"state must be a Mamba2State, got {type(state).__name__}")
    check_shape("state.conv_state", state.conv_state, (batch, self.conv_dim, self.d_conv - 1),
                "(batch, conv_dim, d_conv - 1)")
    check_shape("state.ssm_state", state.ssm_state,
                (batch, self.nheads, self.headdim, self.d_state),
                "(batch, nheads, headdim, d_state)")

  def __call__(self, u: jax.Array, *, initial_state: Optional[Mamba2State] = None,
               seq_idx: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, Mamba2State]:
    """The full-sequence forward (training, prefill).

    Args:
      u: (b, l, d) floating.
      initial_state: optional state to continue from (e.g. after a previous chunk).
      seq_idx: optional (b, l) nondecreasing integer ids of packed sequences: the conv and
        the SSD restart at every change of id (``initial_state`` feeds only a first
        sequence whose id is 0, as in the ops).
      mask: optional (b, l) token mask, 1 token, 0 pad, any layout (left, right, inside):
        pads never touch the state. At its tokens a row gets exactly the output of its
        tokens alone (continuing from ``initial_state``), the returned state is the one
        after its last token, and the output is 0 at pads (``mamba_jax.ops.padding``:
        Δ = 0 at pads, the conv sees each token's real predecessors). Not combined with
        seq_idx.
      return_state: also return the state after the last token (for prefill), taken from
        ``causal_conv1d(return_final_states=True)`` and ``ssd(return_final_states=True)``.

    Returns:
      (b, l, d) in the compute dtype [, Mamba2State].
    """
    check_rank("u", u, 3, "(batch, length, d_model)")
    check_floating("u", u)
    batch, length, _ = u.shape
    check_shape("u", u, (batch, length, self.d_model), "(batch, length, d_model)")
    if initial_state is not None:
      self._check_state(initial_state, batch)
    num_pads = None
    if mask is not None:
      check_token_mask("mask", mask, batch, length)
      if seq_idx is not None:
        raise ValueError("mask cannot be combined with seq_idx: pass one of them")
      order, inverse, num_pads = left_align(mask)
      u = take_along_length(u, order)
    h, p = self.nheads, self.headdim
    with jax.named_scope("mamba2_mixer"):
      zxbcdt = self.in_proj(u)
      plain = (initial_state is None and seq_idx is None and num_pads is None
               and not return_state)
      inner = self._inner(zxbcdt) if plain else None
      if inner is not None:
        return self.out_proj(inner)
      z0, x0, z, xBC, dt = self._split(zxbcdt)
      conv = self.conv1d(
          xBC, activation="silu", seq_idx=seq_idx, return_final_states=return_state,
          initial_states=None if initial_state is None else initial_state.conv_state,
          num_pads=num_pads)
      xBC, conv_state = conv if return_state else (conv, None)
      x, B, C = self._split_conv(xBC)
      dt_args = dict(dt_bias=self.dt_bias[...], dt_softplus=True, dt_limit=self.dt_limit)
      if num_pads is not None:
        # Δ = 0 at pads: exp(0·A) = 1 and 0·x ⊗ B = 0 leave the state as it is.
        real = jnp.promote_types(dt.dtype, jnp.float32)
        dt = preprocess_dt(dt, self.dt_bias[...], True, self.dt_limit, real)
        dt = jnp.where(token_positions(num_pads, length)[..., None], dt, 0)
        dt_args = dict(dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT)
      out = ssd(
          x, dt, self._A(), B, C, chunk_size=self.chunk_size, D=self._D(),
          z=None if self.rmsnorm else z.reshape(batch, length, h, p),
          initial_states=None if initial_state is None else initial_state.ssm_state,
          seq_idx=seq_idx, return_final_states=return_state, **dt_args)
      y, ssm_state = out if return_state else (out, None)
      y = self._output(y.reshape(batch, length, self.d_ssm), z, z0, x0)
      if num_pads is not None:
        y = jnp.where(token_positions(num_pads, length)[..., None], y, 0)
        y = take_along_length(y, inverse)
    if not return_state:
      return y
    return y, Mamba2State(conv_state=conv_state,
                          ssm_state=ssm_state.astype(self._ssm_dtype(conv_state.dtype)))

  def step(self, u_t: jax.Array, state: Mamba2State) -> tuple[jax.Array, Mamba2State]:
    """One decoding step: the recurrent form of ``__call__`` (Mamba-2 §7.3 / eq. (1)).

    Args:
      u_t: (b, d) floating, the current token.
      state: the state after the previous tokens (``init_state`` or a prefill's).

    Returns:
      (y_t (b, d) in the compute dtype, the state after this token). The update runs in
      float32 (or wider) whatever the stored dtype; the new ssm_state is rounded to
      state.ssm_state's dtype (e.g. a bfloat16 ``init_state(state_dtype=...)``).
    """
    check_rank("u_t", u_t, 2, "(batch, d_model)")
    check_floating("u_t", u_t)
    batch = u_t.shape[0]
    check_shape("u_t", u_t, (batch, self.d_model), "(batch, d_model)")
    self._check_state(state, batch)
    with jax.named_scope("mamba2_mixer_step"):
      zxbcdt = self.in_proj(u_t)
      # At batch 1 the step carries two rows (the second zero) from the SSD step on, so that
      # out_proj's product needs no pad kernel in front (mamba_jax.nn.linear).
      rows = max(batch, 2)
      y, conv_state, ssm_state = ssd_decode_step(
          zxbcdt, state.conv_state, self.conv1d.kernel[...], self.conv1d.bias_value(),
          state.ssm_state, self.A_log[...], d_mlp=self.d_mlp,
          groups=self.ngroups, D=self._D(), dt_bias=self.dt_bias[...], gate=not self.rmsnorm,
          dt_softplus=True, dt_limit=self.dt_limit, out_rows=rows)
      z0, x0, z, _, _ = self._split(jnp.pad(zxbcdt, ((0, rows - batch), (0, 0))))
      # XLA's norm: in a decoding step it fuses with its neighbours, where a kernel of its
      # own would add a launch per layer for a row or two.
      y = self._output(y.reshape(rows, self.d_ssm), z, z0, x0, norm_impl="xla")[:batch]
    return y, Mamba2State(conv_state=conv_state,
                          ssm_state=ssm_state.astype(state.ssm_state.dtype))
