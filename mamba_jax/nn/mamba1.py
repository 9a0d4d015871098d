"""The Mamba-1 mixer (Gu & Dao, 2023, §3.4, Figure 3) and its S4D / selectivity ablations.

Mirrors ``mamba_ssm.modules.mamba_simple.Mamba`` option for option and parameter for
parameter:

  [x, z] = u · in_proj                                 (b, l, 2e), stored interleaved
  x = silu(conv1d(x))                                  causal depthwise conv, width w
  [δ, B, C] = x · x_proj,   Δ = softplus(δ · dt_proj + dt_proj.bias)   (§3.2 Algorithm 2)
  y = S6(x; Δ, A, B, C) + D ⊙ x,   A = −exp(A_log)     selective scan (§3.2, eq. (2a)/(2b))
  out = (y ⊙ silu(z)) · out_proj

Ablations (configuration, not forks), Mamba §4.6:

* ``selective``: which of Δ, B, C are functions of the input (Table 7). A non-selective one
  is a learned parameter broadcast over batch and length: Δ = softplus(dt_bias) with
  ``dt_bias`` (e,); B and C (n,) shared by all channels, as the selective B, C are.
  ``ssm_kind="s4d"`` is the LTI layer with none selective (Table 6 "S4D"); it then has no
  ``x_proj`` / ``dt_proj``.
* ``A_init`` (Table 8): "s4d_real" A_n = −(n+1) (default), "s4d_lin" A_n = −1/2 + iπn
  (complex), "s4d_lin_real" A_n = −1/2, "random" A = −exp(N(0, 1)).
* ``dt_rank`` (Table 9) and ``d_state`` (Table 10).

Complex A (s4d_lin). Complex parameters are stored as two real parameters: ``A_log``
(Re A = −exp(A_log)) and ``A_imag`` (Im A); non-selective ``B``, ``C`` with ``B_imag``,
``C_imag``. Selective complex B, C take 2n columns each of x_proj, interleaved
(re₀, im₀, re₁, im₁, ...) as mamba_ssm's ``view_as_complex``. The output is Re(C · h): the
op does not double it as mamba_ssm's reference does (a constant factor the parameters
absorb).

Discretization: the simplified ZOH of the op for every variant (Ā = exp(ΔA), B̄ = ΔB, Mamba
§2 eq. (4)), also for S4D.

Parameters (kernels in flax's (in, out) layout; mamba_ssm's PyTorch weights are (out, in)):
  in_proj.kernel  (d, 2e) columns interleaved per channel: column 2c is x channel c,
                          2c + 1 is z channel c (d, e without the gate: x only);
                          in_proj.bias (2e,) / (e,) with bias, in the same order
  conv1d.kernel   (e, w)  PyTorch's Conv1d weight (e, 1, w) squeezed; kernel[:, w−1] takes
                          the current token. conv1d.bias (e,) with conv_bias.
  x_proj.kernel   (e, r + 2n) columns [δ (r) | B (n) | C (n)], only the selective parts
                          (2n per complex B or C)
  dt_proj.kernel  (r, e), dt_proj.bias (e,)     when Δ is selective
  dt_bias (e,)                                  when Δ is not selective
  B, C (n,) [B_imag, C_imag (n,)]               when B, C are not selective [and A complex]
  A_log (e, n) [A_imag (e, n)], D (e,)
  out_proj.kernel (e, d); out_proj.bias with bias

In_proj layout. mamba_ssm's in_proj holds [x | z] (x in columns 0 .. e−1, z in e .. 2e−1);
ours interleaves them, (x_0, z_0, x_1, z_1, ...), so that any contiguous split of the 2e
columns into T blocks (T dividing e) gives block k exactly the x and z columns of channels
[k·e/T, (k+1)·e/T): tensor parallelism stores each device's share of in_proj directly
(``mamba_jax.sharding``). :func:`mamba_ssm_order` is the fixed permutation between the two,
applied by the converters (``mamba_jax.convert``), so checkpoints keep mamba_ssm's order.

Initialisation as mamba_ssm: dt log-uniform in [dt_min, dt_max] floored at dt_init_floor
through softplus⁻¹; dt_proj kernel U(±r^−1/2·dt_scale) or constant; A_log per A_init in
float32 (wider with a float64 param_dtype); D = 1; Linear kernels and the conv
U(±1/√fan_in) (PyTorch defaults), Linear biases 0; non-selective B = 1, C ~ N(0, 1) (S4D's
init; complex: C ~ CN(0, 1)). The LM rescales
``out_proj`` by 1/√(n_residuals·n_layer). A_log, A_imag, D, dt_proj.bias, dt_bias, B and
all biases carry ``no_weight_decay`` (S4D excludes A, B and Δ from weight decay).

Decoding state (:class:`Mamba1State`): conv_state (b, e, w − 1), the conv's last w − 1
inputs oldest first, in the compute dtype; ssm_state (b, e, n) in float32 (complex64 for a
complex A; float64 / complex128 for a float64 compute dtype), or in the ``state_dtype`` given
to :meth:`~SSMMixerBase.init_state` (storage only: each step reads it into float32, updates,
and rounds the new state back to the stored dtype).

Arithmetic: projections in ``dtype``; the conv and the scan in float32 (float64 for float64)
with Δ's bias, A and D in float32; activations come back in ``dtype``.

Letter legend: b batch, l length, d d_model, e d_inner = expand·d, n d_state, r dt_rank,
w conv width.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mamba_jax.nn.init import (A_INITS, DT_INITS, NO_WEIGHT_DECAY, A_log_init, dt_bias_init,
                               dt_proj_kernel_init, torch_default_init)
from mamba_jax.nn.linear import Linear
from mamba_jax.nn.mamba2 import CausalConv1d
from mamba_jax.ops.checks import (check_choice, check_floating, check_rank, check_shape,
                                  check_state_dtype)
from mamba_jax.ops.padding import (check_token_mask, left_align, take_along_length,
                                   token_positions)
from mamba_jax.ops.selective_decode_step import conv_step_from_pairs, ssm_step_from_rows
from mamba_jax.ops.selective_scan import prepare_delta, selective_scan
from mamba_jax.ops.selective_state_update import selective_state_update

SSM_KINDS = ("s6", "s4d")
SELECTIVE_PARTS = ("delta", "B", "C")
_NO_WD = {NO_WEIGHT_DECAY: True}


@struct.dataclass
class Mamba1State:
  """The recurrent state of one Mamba-1 (or H3) layer after some prefix of the sequence.

  conv_state: (b, e, w − 1) the conv's last w − 1 inputs, oldest first.
  ssm_state: (b, e, n) the SSM state h_t (float32, complex64 for complex A, or wider).
  """
  conv_state: jax.Array
  ssm_state: jax.Array


def check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def mamba_ssm_order(d_inner: int) -> np.ndarray:
  """Where each column of the gated in_proj's interleaved layout sits in mamba_ssm's.

  mamba_ssm: in_proj columns [x (e) | z (e)]; ours: column 2c is x channel c (mamba_ssm's
  column c), column 2c + 1 is z channel c (mamba_ssm's column e + c).

  Returns:
    in_proj_index (2e,) int64, a permutation with ``ours = theirs[..., index]`` along the
    column axis (kernel (d, 2e) axis 1, bias (2e,)); the inverse is ``theirs =
    ours[..., np.argsort(index)]``.
  """
  check_positive_int("d_inner", d_inner)
  channels = np.arange(d_inner, dtype=np.int64)
  return np.stack([channels, d_inner + channels], axis=1).reshape(-1)


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
  """dt_rank "auto" = ⌈d_model / 16⌉ (Mamba §3.6), else the given positive int."""
  if dt_rank == "auto":
    return math.ceil(d_model / 16)
  check_positive_int("dt_rank", dt_rank)
  return dt_rank


def resolve_selective(ssm_kind: str, selective: Optional[Sequence[str]]) -> tuple[str, ...]:
  """The selective parts: all for "s6" by default, none for "s4d"."""
  check_choice("ssm_kind", ssm_kind, SSM_KINDS)
  if selective is None:
    return SELECTIVE_PARTS if ssm_kind == "s6" else ()
  if isinstance(selective, str):
    raise ValueError(f"selective must be a sequence of {SELECTIVE_PARTS}, got the string "
                     f"{selective!r}")
  parts = tuple(selective)
  for part in parts:
    check_choice("selective", part, SELECTIVE_PARTS)
  if len(set(parts)) != len(parts):
    raise ValueError(f"selective={parts} has duplicates")
  if ssm_kind == "s4d" and parts:
    raise ValueError(f"ssm_kind='s4d' is the non-selective (LTI) SSM: selective must be "
                     f"empty or None, got selective={parts}")
  return tuple(p for p in SELECTIVE_PARTS if p in parts)


class SSMMixerBase(nnx.Module):
  """The SSM parameters, their use and the mixer interface, shared by the Mamba-1, no-gate
  and H3 mixers.

  Subclasses call :meth:`_init_ssm` in their constructor (the parameters then sit directly
  on the mixer: ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ... as in mamba_ssm) and
  implement ``_forward`` (full sequence; with ``num_pads`` for a left-aligned masked input,
  passed to the conv and :meth:`_scan`) and ``_forward_step`` (one token).
  """

  def _init_ssm(self, *, d_model: int, d_inner: int, d_state: int, dt_rank: int | str,
                dt_min: float, dt_max: float, dt_init: str, dt_scale: float,
                dt_init_floor: float, ssm_kind: str, selective: Optional[Sequence[str]],
                A_init: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
    check_positive_int("d_state", d_state)
    check_choice("dt_init", dt_init, DT_INITS)
    check_choice("A_init", A_init, A_INITS)
    self.d_inner, self.d_state = d_inner, d_state
    self.dt_rank = resolve_dt_rank(dt_rank, d_model)
    self.ssm_kind, self.A_init = ssm_kind, A_init
    self.selective = resolve_selective(ssm_kind, selective)
    self.is_complex = A_init == "s4d_lin"
    self.dtype, self.param_dtype = dtype, param_dtype
    e, n, r = d_inner, d_state, self.dt_rank
    n_bc = 2 * n if self.is_complex else n  # real columns per selective B or C

    x_proj_out = ((r if "delta" in self.selective else 0)
                  + (n_bc if "B" in self.selective else 0)
                  + (n_bc if "C" in self.selective else 0))
    self.x_proj = (Linear(e, x_proj_out, use_bias=False, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=torch_default_init(e),
                          rngs=rngs) if x_proj_out else None)
    if "delta" in self.selective:
      self.dt_proj = Linear(
          r, e, use_bias=True, dtype=dtype, param_dtype=param_dtype,
          kernel_init=lambda key, shape, dt: dt_proj_kernel_init(key, shape, r, dt_scale,
                                                                 dt_init, dt),
          bias_init=lambda key, shape, dt: dt_bias_init(key, shape, dt_min, dt_max,
                                                        dt_init_floor, dt),
          bias_metadata=_NO_WD, rngs=rngs)
      self.dt_bias = None
    else:
      self.dt_proj = None
      self.dt_bias = nnx.Param(
          dt_bias_init(rngs.params(), (e,), dt_min, dt_max, dt_init_floor, param_dtype),
          **_NO_WD)

    wide = jnp.promote_types(param_dtype, jnp.float32)  # A_log, D: float32 at least
    a_log, a_imag = A_log_init(A_init, rngs.params(), e, n, wide)
    self.A_log = nnx.Param(a_log, **_NO_WD)
    self.A_imag = None if a_imag is None else nnx.Param(a_imag, **_NO_WD)
    self.D = nnx.Param(jnp.ones((e,), wide), **_NO_WD)

    def vector(value: jax.Array, **metadata: Any) -> nnx.Param:
      return nnx.Param(value.astype(param_dtype), **metadata)

    c_std = math.sqrt(0.5) if self.is_complex else 1.0
    f32 = jnp.float32
    self.B = None if "B" in self.selective else vector(jnp.ones((n,), f32), **_NO_WD)
    self.B_imag = (vector(jnp.zeros((n,), f32), **_NO_WD)
                   if self.B is not None and self.is_complex else None)
    self.C = (None if "C" in self.selective
              else vector(c_std * jax.random.normal(rngs.params(), (n,), f32)))
    self.C_imag = (vector(c_std * jax.random.normal(rngs.params(), (n,), f32))
                   if self.C is not None and self.is_complex else None)

  def A(self, dtype: Any = jnp.float32) -> jax.Array:
    """A = −exp(A_log) (+ i·A_imag), (e, n), in float32 / complex64, or wider when A_log or
    ``dtype`` (the compute dtype) is wider."""
    a_log = self.A_log[...]
    real = jnp.promote_types(jnp.promote_types(a_log.dtype, jnp.float32), dtype)
    a = -jnp.exp(a_log.astype(real))
    if self.A_imag is None:
      return a
    return jax.lax.complex(a, self.A_imag[...].astype(a.dtype))

  def _param_bc(self, re: nnx.Param, im: Optional[nnx.Param], lead: tuple[int, ...],
                dtype: Any) -> jax.Array:
    """A non-selective B or C (n,) broadcast to (*lead, n) (complex when A is)."""
    v = re[...].astype(dtype)
    if im is not None:
      v = jax.lax.complex(v, im[...].astype(dtype))
    return jnp.broadcast_to(v, (*lead, self.d_state))

  def _selective_bc(self, cols: jax.Array) -> jax.Array:
    """x_proj columns (..., n) or, for complex A, interleaved (..., 2n) -> (..., n)."""
    if not self.is_complex:
      return cols
    pairs = cols.astype(jnp.promote_types(cols.dtype, jnp.float32)).reshape(
        *cols.shape[:-1], self.d_state, 2)
    return jax.lax.complex(pairs[..., 0], pairs[..., 1])

  def ssm_inputs(self, x: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(δ, Δ bias, B, C) for the SSM input x (..., e); Δ = softplus(δ + bias).

    Selective parts come from x (δ = (x · x_proj)[:r] · dt_proj.kernel, B, C the next
    columns); the others are the broadcast parameters (δ = 0 with bias = dt_bias). Returns
    δ (..., e) in x's dtype, the bias (e,), B and C (..., n).
    """
    lead = x.shape[:-1]
    cols = self.x_proj(x) if self.x_proj is not None else None
    offset = 0

    def take(width: int) -> jax.Array:
      nonlocal offset
      part = cols[..., offset:offset + width]
      offset += width
      return part

    n_bc = 2 * self.d_state if self.is_complex else self.d_state
    if "delta" in self.selective:
      low = take(self.dt_rank)
      delta = jnp.dot(low, self.dt_proj.kernel[...].astype(low.dtype))
      delta_bias = self.dt_proj.bias[...]
    else:
      delta = jnp.zeros((*lead, self.d_inner), x.dtype)
      delta_bias = self.dt_bias[...]
    bc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    B = (self._selective_bc(take(n_bc)) if "B" in self.selective
         else self._param_bc(self.B, self.B_imag, lead, bc_dtype))
    C = (self._selective_bc(take(n_bc)) if "C" in self.selective
         else self._param_bc(self.C, self.C_imag, lead, bc_dtype))
    return delta, delta_bias, B, C

  def _scan(self, x: jax.Array, z: Optional[jax.Array],
            initial_state: Optional[jax.Array], return_state: bool,
            num_pads: Optional[jax.Array] = None):
    """S6 over the sequence x (b, l, e): y = SSM(x) + D ⊙ x, gated by silu(z) when given.

    ``num_pads`` (b,): x is left-aligned (pads first); Δ = 0 at the pads, so that
    h_t = exp(0·A) h_{t−1} + 0·B_t x_t = h_{t−1} there (see ``mamba_jax.ops.padding``).
    """
    delta, delta_bias, B, C = self.ssm_inputs(x)
    if num_pads is not None:
      delta = prepare_delta(delta, delta_bias, True, jnp.promote_types(x.dtype, jnp.float32))
      delta = jnp.where(token_positions(num_pads, x.shape[1])[..., None], delta, 0)
      delta_bias = None
    return selective_scan(x, delta, self.A(x.dtype), B, C, D=self.D[...], z=z,
                          delta_bias=delta_bias, delta_softplus=num_pads is None,
                          initial_state=initial_state, return_final_state=return_state)

  def _scan_step(self, x: jax.Array, z: Optional[jax.Array], ssm_state: jax.Array):
    """One token x (b, e) of :meth:`_scan`: (y (b, e), new ssm_state)."""
    delta, delta_bias, B, C = self.ssm_inputs(x)
    return selective_state_update(ssm_state, x, delta, self.A(x.dtype), B, C,
                                  D=self.D[...], z=z, dt_bias=delta_bias, dt_softplus=True)

  def _ssm_state_dtype(self, dtype: Any, state_dtype: Any = None) -> jnp.dtype:
    """The stored SSM state's dtype: ``state_dtype`` when given (its complex counterpart for
    a complex A), else float32 or wider (``dtype`` promoted)."""
    if state_dtype is not None:
      return check_state_dtype("state_dtype", state_dtype, self.is_complex)
    real = jnp.promote_types(dtype, jnp.float32)
    return jnp.promote_types(real, jnp.complex64) if self.is_complex else real

  # The mixer interface, shared by the subclasses, which implement _forward / _forward_step
  # and set d_model, d_conv (the width of their conv1d) and layer_idx.

  def init_state(self, batch: int, dtype: Any = None, state_dtype: Any = None
                 ) -> Mamba1State:
    """Zero state: conv_state (b, e, w − 1) in dtype (the compute dtype by default),
    ssm_state (b, e, n) in state_dtype, by default float32 (complex64 for complex A; wider
    for float64). A narrower state_dtype (e.g. bfloat16, as mamba_ssm's cache for a bf16
    model) only changes storage: :meth:`step` computes in float32 and rounds on write."""
    dtype = self.dtype if dtype is None else dtype
    return Mamba1State(
        conv_state=jnp.zeros((batch, self.d_inner, self.d_conv - 1), dtype),
        ssm_state=jnp.zeros((batch, self.d_inner, self.d_state),
                            self._ssm_state_dtype(dtype, state_dtype)))

  def _check_state(self, state: Mamba1State, batch: int) -> None:
    if not isinstance(state, Mamba1State):
      raise ValueError(f"state must be a Mamba1State, got {type(state).__name__}")
    check_shape("state.conv_state", state.conv_state, (batch, self.d_inner, self.d_conv - 1),
                "(batch, d_inner, d_conv - 1)")
    check_shape("state.ssm_state", state.ssm_state, (batch, self.d_inner, self.d_state),
                "(batch, d_inner, d_state)")

  def __call__(self, u: jax.Array, *, initial_state: Optional[Mamba1State] = None,
               seq_idx: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, Mamba1State]:
    """The full-sequence forward (training, prefill).

    Args:
      u: (b, l, d) floating.
      initial_state: optional state to continue from.
      seq_idx: not supported: the selective scan has no sequence resets (neither has
        mamba_ssm's Mamba); passing it raises rather than leaking state across sequences.
      mask: optional (b, l) token mask, 1 token, 0 pad, any layout (left, right, inside):
        pads never touch the state. At its tokens a row gets exactly the output of its
        tokens alone (continuing from ``initial_state``), the returned state is the one
        after its last token, and the output is 0 at pads (``mamba_jax.ops.padding``:
        Δ = 0 at pads, the conv sees each token's real predecessors).
      return_state: also return the state after the last token (prefill).

    Returns:
      (b, l, d) in the compute dtype [, Mamba1State].
    """
    if seq_idx is not None:
      raise ValueError(f"{type(self).__name__} does not support seq_idx (packed sequences): "
                       "the selective scan has no state resets; use Mamba2 layers or "
                       "unpacked batches")
    check_rank("u", u, 3, "(batch, length, d_model)")
    check_floating("u", u)
    batch, length, _ = u.shape
    check_shape("u", u, (batch, length, self.d_model), "(batch, length, d_model)")
    if initial_state is not None:
      self._check_state(initial_state, batch)
    with jax.named_scope(type(self).__name__):
      if mask is None:
        y, state = self._forward(u, initial_state, return_state)
      else:
        check_token_mask("mask", mask, batch, length)
        order, inverse, num_pads = left_align(mask)
        y, state = self._forward(take_along_length(u, order), initial_state, return_state,
                                 num_pads)
        y = jnp.where(token_positions(num_pads, length)[..., None], y, 0)
        y = take_along_length(y, inverse)
    if not return_state:
      return y
    return y, Mamba1State(
        conv_state=state.conv_state,
        ssm_state=state.ssm_state.astype(self._ssm_state_dtype(state.conv_state.dtype)))

  def step(self, u_t: jax.Array, state: Mamba1State) -> tuple[jax.Array, Mamba1State]:
    """One decoding step, the recurrent form of ``__call__``.

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
    with jax.named_scope(type(self).__name__ + "_step"):
      y, new = self._forward_step(u_t, state)
    return y, Mamba1State(conv_state=new.conv_state,
                          ssm_state=new.ssm_state.astype(state.ssm_state.dtype))


class Mamba1Mixer(SSMMixerBase):
  """Mamba's selective SSM block (Mamba §3.4, Figure 3 right): the module docstring's equations.

  The selective scan per channel i of e (Mamba §3.2 Algorithm 2 with Ā = exp(ΔA), B̄ = ΔB):

    h_t = exp(Δ_t A_i) ⊙ h_{t−1} + Δ_t B_t x_t,    y_t = Re(C_t · h_t) + D_i x_t
  """

  GATED = True  # the z branch; SSMNoGate (mamba_jax.nn.h3) sets it to False

  def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4,
               expand: float = 2, dt_rank: int | str = "auto", dt_min: float = 0.001,
               dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
               dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
               ssm_kind: str = "s6", selective: Optional[Sequence[str]] = None,
               A_init: str = "s4d_real", layer_idx: Optional[int] = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_positive_int("d_model", d_model)
    check_positive_int("d_conv", d_conv)
    if not expand > 0:
      raise ValueError(f"expand must be > 0, got {expand!r}")
    self.d_model, self.d_conv, self.expand, self.layer_idx = d_model, d_conv, expand, layer_idx
    d_inner = int(expand * d_model)
    check_positive_int("d_inner (expand * d_model)", d_inner)
    e = d_inner
    self.in_proj = Linear(d_model, 2 * e if self.GATED else e, use_bias=bias, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=torch_default_init(d_model),
                          bias_metadata=_NO_WD, rngs=rngs)
    self.conv1d = CausalConv1d(e, d_conv, use_bias=conv_bias, param_dtype=param_dtype,
                               rngs=rngs)
    self._init_ssm(d_model=d_model, d_inner=e, d_state=d_state, dt_rank=dt_rank,
                   dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                   dt_init_floor=dt_init_floor, ssm_kind=ssm_kind, selective=selective,
                   A_init=A_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out_proj = Linear(e, d_model, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                           kernel_init=torch_default_init(e), bias_metadata=_NO_WD,
                           rngs=rngs)

  def mamba_ssm_order(self) -> Optional[np.ndarray]:
    """This mixer's in_proj_index (module function :func:`mamba_ssm_order`, ``ours =
    theirs[..., index]``), or None without the gate (in_proj is x alone, same order)."""
    return mamba_ssm_order(self.d_inner) if self.GATED else None

  def _split(self, xz: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
    """in_proj's output (..., 2e) in the interleaved layout -> x, z (..., e); without the
    gate (..., e) -> x, None."""
    if not self.GATED:
      return xz, None
    pairs = xz.reshape(*xz.shape[:-1], self.d_inner, 2)  # (..., e, [x, z])
    return pairs[..., 0], pairs[..., 1]

  def _forward(self, u: jax.Array, initial_state: Optional[Mamba1State],
               return_state: bool, num_pads: Optional[jax.Array] = None
               ) -> tuple[jax.Array, Optional[Mamba1State]]:
    x, z = self._split(self.in_proj(u))
    conv = self.conv1d(
        x, activation="silu", return_final_states=return_state,
        initial_states=None if initial_state is None else initial_state.conv_state,
        num_pads=num_pads)
    x, conv_state = conv if return_state else (conv, None)
    out = self._scan(x, z, None if initial_state is None else initial_state.ssm_state,
                     return_state, num_pads)
    y, ssm_state = out if return_state else (out, None)
    state = Mamba1State(conv_state, ssm_state) if return_state else None
    return self.out_proj(y), state

  def _forward_step(self, u_t: jax.Array, state: Mamba1State
                    ) -> tuple[jax.Array, Mamba1State]:
    xz = self.in_proj(u_t)
    if not (self.GATED and self.selective == SELECTIVE_PARTS and not self.is_complex):
      x, z = self._split(xz)
      x, conv_state = self.conv1d.step(x, state.conv_state, activation="silu")
      y, ssm_state = self._scan_step(x, z, state.ssm_state)
      return self.out_proj(y), Mamba1State(conv_state, ssm_state)
    # The S6 layer: its conv and SSM steps read in_proj's and x_proj's outputs in place (the
    # decoding kernels of ops.selective_decode_step on GPUs). At batch 1 they hand x_proj and
    # out_proj two rows, the second zero, so that neither needs a pad kernel in front.
    batch = u_t.shape[0]
    rows = max(batch, 2)
    pairs = xz.reshape(batch, self.d_inner, 2)  # (b, e, [x, z])
    x, conv_state = conv_step_from_pairs(pairs, state.conv_state, self.conv1d.kernel[...],
                                         self.conv1d.bias_value(), out_rows=rows)
    x_dbl = self.x_proj(x)
    delta = jnp.dot(x_dbl[:, :self.dt_rank], self.dt_proj.kernel[...].astype(x_dbl.dtype))
    y, ssm_state = ssm_step_from_rows(state.ssm_state, x, delta, x_dbl, pairs, self.A_log[...],
                                      self.D[...], self.dt_proj.bias[...],
                                      dt_rank=self.dt_rank, out_rows=rows)
    return self.out_proj(y)[:batch], Mamba1State(conv_state, ssm_state)
