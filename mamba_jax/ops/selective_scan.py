"""Selective scan (S6), the public entry point: validation, Δ preprocessing, dispatch, D and z.

Mamba §3.2 Algorithm 2 with the simplified discretization (Mamba §2 eq. (4), Ā = exp(ΔA),
B̄ = ΔB), with exactly the semantics of mamba_ssm's ``selective_scan_fn`` for real A. The forms
(sequential oracle, associative, chunked) live in their own files and share one core signature
in a grouped float32 (or float64) layout; this file prepares their inputs and finishes their
outputs, once for all forms. The decoding step ``selective_state_update`` reuses the helpers
below.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp

from mamba_jax.ops.checks import (check_choice, check_divisible, check_floating, check_rank,
                                  check_shape)
from mamba_jax.ops.impl import is_hopper_or_newer, platform, resolve_impl
from mamba_jax.ops.selective_scan_associative import selective_scan_associative
from mamba_jax.ops.selective_scan_chunked import (CHUNK_SIZE, check_chunk_size,
                                                  selective_scan_chunked)
from mamba_jax.ops.selective_scan_pallas import selective_scan_pallas
from mamba_jax.ops.selective_scan_pallas import supports as selective_scan_pallas_supports
from mamba_jax.ops.selective_scan_sequential import selective_scan_sequential

ScanFn = Callable[..., tuple[jax.Array, jax.Array]]


def _forms(chunk_size: int) -> dict[str, ScanFn]:
  """The forms by name, each ``(u, delta, A, B, C, initial_state) -> (y, final_state)``.

  A new form (e.g. a Pallas kernel) is one more entry here.
  """
  return {
      "sequential": selective_scan_sequential,
      "associative": selective_scan_associative,
      "chunked": lambda *args: selective_scan_chunked(*args, chunk_size=chunk_size),
  }


# "pallas" takes the raw inputs (the kernels fuse Δ preprocessing, D and z), so it is routed
# before the shared preprocessing rather than through ``_forms``.
IMPLS = (*_forms(CHUNK_SIZE), "pallas")


def _auto(**arrays: Any) -> str:
  """What ``impl="auto"`` runs: the Pallas kernels on Hopper GPUs, else the chunked form.

  On an H100 (bf16, d_inner 2048, N 16, 65,536 tokens, L = 1K-64K) the Mosaic GPU kernels that
  "pallas" runs there take 1.1-2.4 ms forward and 7.8-10.0 ms forward+backward, 1.16-1.89x and
  1.26-1.49x mamba_ssm's CUDA kernel in the same call (docs/results/s6_mosaic_h100.json; the
  Triton-lowered ones 3.7-62 and 29-199 ms) against the chunked form's 19-26 and 149-181 ms,
  and they match the float64 oracle there (tests/kernels/test_selective_scan_gpu.py,
  test_selective_scan_mgpu.py). Inputs they do not take
  (``selective_scan_pallas.supports``: complex A, float64) keep the chunked form, and the log
  says why. The TPU kernels stay opt-in (``impl="pallas"``) until compiled and timed on a TPU.
  """
  if platform() != "gpu" or not is_hopper_or_newer():
    return "chunked"
  ok, why = selective_scan_pallas_supports(**arrays)
  if not ok:
    logging.info("selective_scan: impl='auto' keeps the chunked form on this GPU: %s", why)
    return "chunked"
  logging.info("selective_scan: impl='auto' runs the Pallas kernels (a Hopper or newer GPU)")
  return "pallas"


def compute_dtypes(A: jax.Array, *arrays: Any) -> tuple[jnp.dtype, jnp.dtype]:
  """(real, state) compute dtypes: float32 at least, float64 if any input is float64.

  The state dtype is the complex counterpart of the real one when A is complex. ``None``
  entries of ``arrays`` (absent optional inputs) are ignored.
  """
  real = jnp.dtype(jnp.float32)
  for x in (A, *arrays):
    if x is not None:
      real = jnp.promote_types(real, jnp.finfo(jnp.result_type(x)).dtype)
  if jnp.iscomplexobj(A):
    return real, jnp.promote_types(real, jnp.complex64)
  return real, real


def check_input_matrix(name: str, x: Any, lead: tuple[int, ...], lead_layout: str,
                       d_inner: int, d_state: int, complex_ok: bool) -> int:
  """Validates B or C, (*lead, n) or (*lead, g, n), and returns its number of groups g."""
  layout = f"({lead_layout}, d_state) or ({lead_layout}, groups, d_state)"
  check_rank(name, x, (len(lead) + 1, len(lead) + 2), layout)
  if jnp.iscomplexobj(x) and not complex_ok:
    raise ValueError(f"{name} has complex dtype {jnp.result_type(x)} but A is real: "
                     "complex B and C need a complex A")
  check_floating(name, x, allow_complex=True)
  groups = 1 if jnp.ndim(x) == len(lead) + 1 else jnp.shape(x)[-2]
  check_shape(name, x, (*lead, *((groups,) if jnp.ndim(x) > len(lead) + 1 else ()), d_state),
              layout)
  check_divisible("d_inner", d_inner, f"the number of groups of {name}", groups)
  return groups


def check_state(name: str, x: Any, expected: tuple[int, ...], layout: str,
                complex_ok: bool) -> None:
  """Validates a state: its shape, and complex exactly when A is complex."""
  check_shape(name, x, expected, layout)
  check_floating(name, x, allow_complex=True)
  if jnp.iscomplexobj(x) != complex_ok:
    raise ValueError(f"{name} has dtype {jnp.result_type(x)}; it must be "
                     f"{'complex' if complex_ok else 'real'} because A is "
                     f"{'complex' if complex_ok else 'real'}")


def check_optional_vector(name: str, x: Any, size: int) -> None:
  if x is not None:
    check_shape(name, x, (size,), "(d_inner,)")
    check_floating(name, x)


def prepare_delta(delta: jax.Array, delta_bias: jax.Array | None, delta_softplus: bool,
                  dtype: jnp.dtype) -> jax.Array:
  """Δ = softplus(delta + delta_bias) (each part optional), computed in ``dtype``."""
  delta = jnp.asarray(delta, dtype)
  if delta_bias is not None:
    delta = delta + jnp.asarray(delta_bias, dtype)
  return jax.nn.softplus(delta) if delta_softplus else delta


def skip_and_gate(y: jax.Array, u: jax.Array, D: jax.Array | None, z: jax.Array | None,
                  dtype: jnp.dtype) -> jax.Array:
  """out = (y + D ⊙ u) ⊙ silu(z) (each part optional; Mamba §3.4 Figure 3), in ``dtype``."""
  if D is not None:
    y = y + jnp.asarray(u, dtype) * jnp.asarray(D, dtype)
  if z is not None:
    y = y * jax.nn.silu(jnp.asarray(z, dtype))
  return y


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, z: jax.Array | None = None,
                   delta_bias: jax.Array | None = None, delta_softplus: bool = False,
                   initial_state: jax.Array | None = None, return_final_state: bool = False,
                   impl: str = "auto", chunk_size: int = CHUNK_SIZE
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The selective SSM (S6) of Mamba §3.2 Algorithm 2, with mamba_ssm's semantics.

    Δ = softplus(delta + delta_bias)         (bias and softplus optional)
    h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t  (simplified ZOH, Mamba §2 eq. (4): B̄ = ΔB)
    y_t = Re(C_t · h_t) + D ⊙ u_t
    out_t = y_t ⊙ silu(z_t)                  (if z is given)

  per channel i of d_inner, where B_t, C_t are those of the group i // (d_inner // groups).
  h_0 is ``initial_state`` (zeros if None).

  A is expected to have a negative real part (a decaying, stable recurrence; Mamba uses
  A = −exp(A_log)), but this is not required: S4D ablations use other values.

  Complex A (S4D-Lin ablation): B and C may be real or complex, the state is complex, and the
  output is Re(C_t · h_t). mamba_ssm's reference returns 2·Re(C_t · h_t), counting each state
  once for itself and once for its conjugate; this function does not double.

  Shapes (b batch, l length, e d_inner, n d_state, g groups):
    u, delta, z: (b, l, e); A: (e, n); B, C: (b, l, n) or (b, l, g, n) with e % g == 0;
    D, delta_bias: (e,); initial_state: (b, e, n).

  Dtypes: any floating inputs (bf16, fp16, fp32, fp64). The state and all accumulation are in
  float32, or float64 when some input is float64 (complex64 / complex128 for complex A).
  Every floating input is differentiable.

  Args:
    u: input sequence.
    delta: step sizes before bias and softplus.
    A: diagonal state matrix, real or complex.
    B: input matrices, shared by the channels of a group.
    C: output matrices, shared by the channels of a group.
    D: skip connection.
    z: gate.
    delta_bias: added to delta before the softplus.
    delta_softplus: apply softplus to delta (after the bias).
    initial_state: the state before the first token.
    return_final_state: also return the state after the last token.
    impl: "auto" ("pallas" on Hopper GPUs for inputs the kernels take, else "chunked"; see
      ``_auto``), "sequential" (the ``lax.scan`` oracle),
      "associative" (one ``lax.associative_scan`` over the length; memory O(b·l·e·n)), or
      "chunked" (scan over chunks of ``chunk_size``; memory O(b·l·e + b·e·n·l/chunk_size)), or
      "pallas" (fused Pallas kernels; float32/bf16/fp16 and real A only; on CPU they run in
      the Pallas interpreter).
    chunk_size: tokens per chunk of the chunked form.

  Returns:
    out (b, l, e) in u's dtype; with ``return_final_state`` the pair (out, final_state), the
    state (b, e, n) in the compute dtype (float32 / float64, complex for complex A).

  Raises:
    ValueError: on a wrong rank, shape or dtype of any argument, d_inner not divisible by the
      groups, complex B/C/initial_state with a real A, or an unknown ``impl``.
  """
  check_rank("u", u, 3, "(batch, length, d_inner)")
  check_floating("u", u)
  batch, length, d_inner = jnp.shape(u)
  if length < 1:
    raise ValueError(f"u must have length >= 1, got shape {tuple(jnp.shape(u))}")
  check_shape("delta", delta, (batch, length, d_inner), "(batch, length, d_inner)")
  check_floating("delta", delta)
  check_rank("A", A, 2, "(d_inner, d_state)")
  check_floating("A", A, allow_complex=True)
  d_state = jnp.shape(A)[1]
  check_shape("A", A, (d_inner, d_state), "(d_inner, d_state)")
  is_complex = jnp.iscomplexobj(A)
  groups = check_input_matrix("B", B, (batch, length), "batch, length", d_inner, d_state,
                              is_complex)
  groups_c = check_input_matrix("C", C, (batch, length), "batch, length", d_inner, d_state,
                                is_complex)
  if groups_c != groups:
    raise ValueError(f"B and C must have the same number of groups, got B shape "
                     f"{tuple(jnp.shape(B))} and C shape {tuple(jnp.shape(C))}")
  check_optional_vector("D", D, d_inner)
  check_optional_vector("delta_bias", delta_bias, d_inner)
  if z is not None:
    check_shape("z", z, (batch, length, d_inner), "(batch, length, d_inner)")
    check_floating("z", z)
  if initial_state is not None:
    check_state("initial_state", initial_state, (batch, d_inner, d_state),
                "(batch, d_inner, d_state)", is_complex)
  check_choice("delta_softplus", delta_softplus, (False, True))
  check_choice("return_final_state", return_final_state, (False, True))
  impl = resolve_impl("selective_scan", impl, IMPLS, lambda: _auto(
      u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
      initial_state=initial_state))
  check_chunk_size(chunk_size)
  if impl == "pallas":
    with jax.named_scope("selective_scan_pallas"):
      return selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   initial_state, return_final_state)

  real, state_dtype = compute_dtypes(A, u, delta, B, C, D, z, delta_bias, initial_state)
  per_group = d_inner // groups

  def grouped(x, dtype):
    """(..., e) -> (..., g, p) for per-channel arrays, in the compute dtype."""
    return jnp.asarray(x, dtype).reshape(*jnp.shape(x)[:-1], groups, per_group)

  def grouped_bc(x):
    return jnp.asarray(x, state_dtype).reshape(batch, length, groups, d_state)

  if initial_state is None:
    h0 = jnp.zeros((batch, groups, per_group, d_state), state_dtype)
  else:
    h0 = jnp.asarray(initial_state, state_dtype).reshape(batch, groups, per_group, d_state)
  with jax.named_scope(f"selective_scan_{impl}"):
    y, final_state = _forms(chunk_size)[impl](
        grouped(u, real), grouped(prepare_delta(delta, delta_bias, delta_softplus, real), real),
        jnp.asarray(A, state_dtype).reshape(groups, per_group, d_state), grouped_bc(B),
        grouped_bc(C), h0)
    out = skip_and_gate(y.reshape(batch, length, d_inner), u, D, z, real)
  out = out.astype(jnp.result_type(u))
  if return_final_state:
    return out, final_state.reshape(batch, d_inner, d_state)
  return out
