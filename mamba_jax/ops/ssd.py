"""Mamba-2's SSD layer op: the public entry point.

``ssd`` validates its arguments, preprocesses dt, dispatches to one form of the state space
dual (sequential oracle, quadratic dual, chunked SSD algorithm), then applies the skip D and the
gate z. Its semantics are those of mamba_ssm's ``mamba_chunk_scan_combined``.

Every form's core shares one signature after preprocessing,
``core(x, dt, A, B, C, chunk_size, initial_states, seq_idx) -> (y, final_states)``, with dt and
A in the compute dtype, so D, z and dtype handling live here once. A form that takes the raw
arguments (a fused kernel) is added as one more entry of ``_FORMS`` with the full signature
``(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
seq_idx) -> (y, final_states)``.

Shape legend: b batch, l length, h heads, p head_dim, n d_state, g groups.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.ops.checks import (check_divisible, check_floating, check_integer, check_rank,
                                  check_shape, is_concrete)
from mamba_jax.ops import ssd_pallas
from mamba_jax.ops.impl import is_hopper_or_newer, platform, resolve_impl
from mamba_jax.ops.ssd_chunked import ssd_chunked
from mamba_jax.ops.ssd_quadratic import ssd_quadratic
from mamba_jax.ops.ssd_sequential import ssd_sequential

NO_DT_LIMIT = (0.0, float("inf"))


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """float32, or float64 when any given (non-None) floating input is float64."""
  dtypes = [jnp.result_type(a) for a in arrays if a is not None]
  return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes)) if dtypes else jnp.float32


def preprocess_dt(dt: jax.Array, dt_bias: jax.Array | None, dt_softplus: bool,
                  dt_limit: tuple[float, float], dtype: Any) -> jax.Array:
  """dt ← clip(softplus(dt + dt_bias), *dt_limit), as mamba_ssm's ``_chunk_cumsum_fwd``.

  Mamba-2 §7.1 / mamba_ssm: the bias is added, then softplus when ``dt_softplus``; the clip is
  applied only when ``dt_limit != (0, inf)``. All in ``dtype`` (float32 or float64).

  Args:
    dt: (b, l, h) or (b, h) raw step sizes, any floating dtype.
    dt_bias: optional (h,).
    dt_softplus: apply softplus after the bias.
    dt_limit: (min, max) clip range.
    dtype: the compute dtype.
  """
  dt = dt.astype(dtype)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(dtype)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  if tuple(dt_limit) != NO_DT_LIMIT:
    dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
  return dt


def skip_and_gate(y: jax.Array, x: jax.Array, D: jax.Array | None,
                  z: jax.Array | None) -> jax.Array:
  """y ← (y + D x) · silu(z) (Mamba-2 §7.1 skip connection and gate), in y's dtype.

  Args:
    y: (..., h, p) SSM output in the compute dtype.
    x: (..., h, p) the SSM input.
    D: optional (h,) per-head or (h, p) per-channel skip.
    z: optional (..., h, p) gate.
  """
  dtype = y.dtype
  if D is not None:
    skip = D[:, None] if D.ndim == 1 else D
    y = y + x.astype(dtype) * skip.astype(dtype)
  if z is not None:
    y = y * jax.nn.silu(z.astype(dtype))
  return y


def validate_head_params(h: int, p: int, A: Any, D: Any, dt_bias: Any, dt_limit: Any) -> None:
  """Checks the per-head parameters shared by ``ssd`` and ``ssd_state_update``."""
  check_shape("A", A, (h,), "(heads,)")
  check_floating("A", A)
  if is_concrete(A) and np.any(np.asarray(A, np.float64) > 0):
    raise ValueError(
        f"A must be negative (A = -exp(A_log)), got max(A) = {float(np.max(np.asarray(A)))}")
  if D is not None:
    check_rank("D", D, (1, 2), "(heads,) or (heads, head_dim)")
    check_shape("D", D, (h,) if jnp.ndim(D) == 1 else (h, p),
                "(heads,)" if jnp.ndim(D) == 1 else "(heads, head_dim)")
    check_floating("D", D)
  if dt_bias is not None:
    check_shape("dt_bias", dt_bias, (h,), "(heads,)")
    check_floating("dt_bias", dt_bias)
  ok = isinstance(dt_limit, Sequence) and len(dt_limit) == 2 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
      for v in dt_limit)
  if not ok or not 0 <= dt_limit[0] <= dt_limit[1]:
    raise ValueError(
        f"dt_limit must be a pair (min, max) of numbers with 0 <= min <= max, got {dt_limit!r}")


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states,
              seq_idx) -> None:
  """Raises ValueError on any malformed ``ssd`` argument."""
  check_rank("x", x, 4, "(batch, length, heads, head_dim)")
  check_floating("x", x)
  b, l, h, p = x.shape
  if l < 1:
    raise ValueError(f"x must have length >= 1, got shape {tuple(x.shape)}")
  check_shape("dt", dt, (b, l, h), "(batch, length, heads)")
  check_floating("dt", dt)
  check_rank("B", B, 4, "(batch, length, groups, d_state)")
  g, n = B.shape[2], B.shape[3]
  check_shape("B", B, (b, l, g, n), "(batch, length, groups, d_state)")
  check_floating("B", B)
  check_shape("C", C, (b, l, g, n), "(batch, length, groups, d_state)")
  check_floating("C", C)
  check_divisible("heads (x.shape[2])", h, "groups (B.shape[2])", g)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  validate_head_params(h, p, A, D, dt_bias, dt_limit)
  if z is not None:
    check_shape("z", z, (b, l, h, p), "(batch, length, heads, head_dim)")
    check_floating("z", z)
  if initial_states is not None:
    check_shape("initial_states", initial_states, (b, h, p, n),
                "(batch, heads, head_dim, d_state)")
    check_floating("initial_states", initial_states)
  if seq_idx is not None:
    check_shape("seq_idx", seq_idx, (b, l), "(batch, length)")
    check_integer("seq_idx", seq_idx)
    if is_concrete(seq_idx) and np.any(np.diff(np.asarray(seq_idx), axis=1) < 0):
      raise ValueError("seq_idx must be nondecreasing along the length")


@functools.partial(jax.jit, static_argnames=("core", "chunk_size", "dt_softplus", "dt_limit"))
def _ssd_jnp(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
             seq_idx, *, core: Callable[..., tuple[jax.Array, jax.Array]]):
  """Preprocesses dt, runs ``core``, applies D and z; y in x's dtype."""
  dtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
  dt = preprocess_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
  y, final_states = core(x, dt, A.astype(dtype), B, C, chunk_size, initial_states, seq_idx)
  y = skip_and_gate(y, x, D, z)
  return y.astype(x.dtype), final_states


# impl name -> function of the full raw signature (x, dt, A, B, C, chunk_size, D, z, dt_bias,
# dt_softplus, dt_limit, initial_states, seq_idx) -> (y in x's dtype, final_states). A fused
# kernel is one more entry here.
_FORMS = {
    "sequential": functools.partial(_ssd_jnp, core=ssd_sequential),
    "quadratic": functools.partial(_ssd_jnp, core=ssd_quadratic),
    "chunked": functools.partial(_ssd_jnp, core=ssd_chunked),
}
_FORMS["pallas"] = functools.partial(ssd_pallas.ssd_pallas, reference=_FORMS["chunked"])


def _auto_form(x, B, C, z, chunk_size) -> str:
  """The form ``impl="auto"`` runs: the Pallas kernels on Hopper GPUs, else the chunked SSD.

  On an H100 (bf16, 32 heads x 64, N = 128, 65,536 tokens) the kernels' forward+backward takes
  5.2-5.7 ms against the chunked form's 19-22 ms, and they match the float64 oracle there
  (tests/kernels/test_ssd_gpu.py). Inputs the kernels do not take (``ssd_pallas.supports``:
  float64, head_dim/d_state/chunk not a power of two >= 16, mixed dtypes) fall back to the
  chunked form, and the log line says why. The TPU kernels stay opt-in (``impl="pallas"``) until
  they are compiled and timed on a TPU: they are tested in TPU interpret mode only.
  """
  if platform() != "gpu" or not is_hopper_or_newer():
    return "chunked"
  ok, why = ssd_pallas.supports(x, B, C, z, chunk_size)
  if not ok:
    logging.info("ssd: impl='auto' keeps the chunked form on this GPU: %s", why)
    return "chunked"
  return "pallas"


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
        chunk_size: int = 256, D: jax.Array | None = None, z: jax.Array | None = None,
        dt_bias: jax.Array | None = None, dt_softplus: bool = False,
        dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_states: jax.Array | None = None,
        seq_idx: jax.Array | None = None, return_final_states: bool = False,
        impl: str = "auto") -> jax.Array | tuple[jax.Array, jax.Array]:
  """Mamba-2's selective state space layer, SSD (Dao & Gu, 2024, §3 and §7.1).

      dt_t ← clip(softplus(dt_t + dt_bias), *dt_limit)   (softplus/clip only when asked)
      h_t  = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t
      y_t  = (h_t C_t + D x_t) · silu(z_t)

  per head (A is a scalar per head, Mamba-2 §3.3); head i reads group i // (h // g) of B and C.
  Exactly mamba_ssm's ``mamba_chunk_scan_combined``.

  Packed sequences: where ``seq_idx[t] != seq_idx[t-1]`` the state resets to 0 before step t,
  comparing position 0 with a virtual ``seq_idx[-1] = 0``. So ``initial_states`` feeds only a
  leading segment whose id is 0; if ``seq_idx[0] != 0`` it is ignored (as in mamba_ssm's
  kernels).

  Args:
    x: (b, l, h, p) floating.
    dt: (b, l, h) floating, raw step sizes.
    A: (h,) floating, <= 0.
    B, C: (b, l, g, n) floating, with h % g == 0.
    chunk_size: positive int, positions per chunk of the chunked form (256 by default).
    D: optional (h,) or (h, p) skip.
    z: optional (b, l, h, p) gate.
    dt_bias: optional (h,).
    dt_softplus: apply softplus to dt + dt_bias.
    dt_limit: (min, max) clip of dt; (0, inf) means no clip.
    initial_states: optional (b, h, p, n) state before t = 0.
    seq_idx: optional (b, l) integer segment ids, nondecreasing.
    return_final_states: also return the state after the last position.
    impl: "auto", "sequential", "quadratic", "chunked" or "pallas" (fused kernels; on CPU they
      run in the Pallas interpreter). "auto" picks "pallas" on Hopper GPUs for inputs the
      kernels take, else "chunked" (see ``_auto_form``); the choice is logged.

  Returns:
    y: (b, l, h, p) in x's dtype; with ``return_final_states`` also final_states
    (b, h, p, n), float32 (float64 when an input is float64). bf16/fp16 inputs are computed in
    float32.

  Raises:
    ValueError: on malformed arguments, naming the argument and what was expected.
  """
  _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, seq_idx)
  form = resolve_impl("ssd", impl, tuple(_FORMS),
                      lambda: _auto_form(x, B, C, z, int(chunk_size)))
  dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
  with jax.named_scope(f"ssd_{form}"):
    y, final_states = _FORMS[form](x, dt, A, B, C, int(chunk_size), D, z, dt_bias,
                                   bool(dt_softplus), dt_limit, initial_states, seq_idx)
  return (y, final_states) if return_final_states else y
