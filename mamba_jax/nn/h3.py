"""The H3 block and the gate-less SSM block: the baselines of Mamba's architecture ablations.

H3 (Fu et al., 2023, "Hungry Hungry Hippos", §3.1; Mamba Figure 3 left) mixes with a shift
SSM, a diagonal SSM and two multiplicative interactions:

  [q, k, v] = u · in_proj                              (b, l, 3e)
  k̃ = shift(k)                                         shift SSM = causal conv, width w
  y = SSM_diag(k̃ ⊙ v) + D ⊙ (k̃ ⊙ v)                    the S4D / S6 scan of Mamba1Mixer
  out = (q ⊙ y) · out_proj

The shift SSM (A the shift matrix, B = e₁, learned C) is exactly a causal depthwise
convolution of width N with kernel C: it is implemented as one (``conv1d``, no activation).
H3 used N = 64 and head dimension 1 (elementwise k̃ ⊙ v, as here); ``shift_width`` defaults
to mamba_ssm's short conv width 4. The diagonal SSM is the same parameterisation as
:class:`mamba_jax.nn.mamba1.Mamba1Mixer` (``ssm_kind`` / ``selective`` / ``A_init``), so
``ssm_kind="s4d"`` is "H3 / S4" and ``"s6"`` is "H3 / S6" of Mamba Table 1; the default is
the original non-selective H3. With ``expand`` 1 (H3's width) by default.

``SSMNoGate`` is the Mamba block without its multiplicative z branch (Mamba Table 1, the
"No gate" rows: in_proj → conv → SSM → out_proj), with S4D ("S4") or S6 per ``ssm_kind``.

Parameters (flax (in, out) kernels), H3:
  in_proj.kernel (d, 3e) columns [q | k | v]; in_proj.bias (3e,) with bias
  conv1d.kernel (e, w) the shift SSM (kernel[:, w−1] takes the current token); conv1d.bias
                (e,) with conv_bias (H3's shift SSM has none: False by default)
  the SSM parameters of Mamba1Mixer (x_proj, dt_proj or dt_bias, A_log [A_imag], B, C, D)
  out_proj.kernel (e, d); out_proj.bias with bias
SSMNoGate: Mamba1Mixer's, with in_proj.kernel (d, e).

Decoding state: :class:`mamba_jax.nn.mamba1.Mamba1State` (the shift conv's last w − 1
inputs k, and the diagonal SSM state).

Letter legend: b batch, l length, d d_model, e d_inner = expand·d, n d_state, w conv width.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.nn.init import NO_WEIGHT_DECAY, torch_default_init
from mamba_jax.nn.linear import Linear
from mamba_jax.nn.mamba1 import Mamba1Mixer, Mamba1State, SSMMixerBase, check_positive_int
from mamba_jax.nn.mamba2 import CausalConv1d


class H3Mixer(SSMMixerBase):
  """H3 (Fu et al., 2023, §3.1, head dimension 1): out = (q ⊙ SSM(shift(k) ⊙ v)) · W_out.

  The diagonal SSM per channel i (simplified ZOH, Mamba §2 eq. (4)):

    h_t = exp(Δ_t A_i) ⊙ h_{t−1} + Δ_t B_t s_t,   y_t = Re(C_t · h_t) + D_i s_t,
    s_t = k̃_t ⊙ v_t

  with Δ, B, C parameters (ssm_kind="s4d") or functions of s_t ("s6").
  """

  def __init__(self, d_model: int, *, d_state: int = 16, expand: float = 1,
               shift_width: int = 4, dt_rank: int | str = "auto", dt_min: float = 0.001,
               dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
               dt_init_floor: float = 1e-4, conv_bias: bool = False, bias: bool = False,
               ssm_kind: str = "s4d", selective: Optional[Sequence[str]] = None,
               A_init: str = "s4d_real", layer_idx: Optional[int] = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_positive_int("d_model", d_model)
    check_positive_int("shift_width", shift_width)
    if not expand > 0:
      raise ValueError(f"expand must be > 0, got {expand!r}")
    e = int(expand * d_model)
    check_positive_int("d_inner (expand * d_model)", e)
    self.d_model, self.expand, self.layer_idx = d_model, expand, layer_idx
    self.d_conv = shift_width
    no_wd = {NO_WEIGHT_DECAY: True}
    self.in_proj = Linear(d_model, 3 * e, use_bias=bias, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=torch_default_init(d_model),
                          bias_metadata=no_wd, rngs=rngs)
    self.conv1d = CausalConv1d(e, shift_width, use_bias=conv_bias, param_dtype=param_dtype,
                               rngs=rngs)
    self._init_ssm(d_model=d_model, d_inner=e, d_state=d_state, dt_rank=dt_rank,
                   dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                   dt_init_floor=dt_init_floor, ssm_kind=ssm_kind, selective=selective,
                   A_init=A_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out_proj = Linear(e, d_model, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=torch_default_init(e), bias_metadata=no_wd,
                           rngs=rngs)

  def _forward(self, u: jax.Array, initial_state: Optional[Mamba1State],
               return_state: bool, num_pads: Optional[jax.Array] = None
               ) -> tuple[jax.Array, Optional[Mamba1State]]:
    q, k, v = jnp.split(self.in_proj(u), 3, axis=-1)
    shift = self.conv1d(
        k, return_final_states=return_state,
        initial_states=None if initial_state is None else initial_state.conv_state,
        num_pads=num_pads)
    k, conv_state = shift if return_state else (shift, None)
    out = self._scan(k * v, None, None if initial_state is None else initial_state.ssm_state,
                     return_state, num_pads)
    y, ssm_state = out if return_state else (out, None)
    state = Mamba1State(conv_state, ssm_state) if return_state else None
    return self.out_proj(q * y.astype(q.dtype)), state

  def _forward_step(self, u_t: jax.Array, state: Mamba1State
                    ) -> tuple[jax.Array, Mamba1State]:
    q, k, v = jnp.split(self.in_proj(u_t), 3, axis=-1)
    k, conv_state = self.conv1d.step(k, state.conv_state)
    y, ssm_state = self._scan_step(k * v, None, state.ssm_state)
    return self.out_proj(q * y.astype(q.dtype)), Mamba1State(conv_state, ssm_state)


class SSMNoGate(Mamba1Mixer):
  """The Mamba block without the z gate (Mamba Table 1 "No gate").

    out = SSM(silu(conv(u · W_in))) · W_out

  Same options, parameters and recurrence as :class:`Mamba1Mixer`; in_proj has e outputs.
  """

  GATED = False
