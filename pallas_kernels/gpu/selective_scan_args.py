"""The argument contract of the Pallas selective-scan (S6) kernels, shared by GPU and TPU.

Both platforms' public wrappers (``pallas_kernels.gpu.selective_scan`` and
``pallas_kernels.tpu.selective_scan``) take the same arguments in the same order, with the
semantics of mamba_ssm's ``selective_scan_fn`` plus ``seq_idx``; this file validates them,
builds the per-position decay mask of ``seq_idx``, and holds the scalar activations the kernels
evaluate in float32 (written with ``exp`` / ``log1p`` only, which both Triton and Mosaic lower).

Shape legend: b batch, l length, d d_inner, n d_state, g groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_power_of_two(v: int) -> bool:
  """Triton block dimensions must be powers of two."""
  return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True)
class ScanDims:
  """Sizes read off validated arguments: b, l, d, n, g."""
  batch: int
  length: int
  d_inner: int
  d_state: int
  groups: int


def _dtype_ok(x) -> bool:
  return jnp.dtype(jnp.result_type(x)) in INPUT_DTYPES


def _describe(x) -> str:
  return f"shape {tuple(jnp.shape(x))} dtype {jnp.result_type(x)}"


def check_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
               return_final_state) -> ScanDims:
  """Validates the selective-scan arguments; raises ValueError naming the first bad one.

  Expected: u, delta, z (b, l, d); A (d, n) real; B, C (b, l, n) or (b, l, g, n) with g | d;
  D, delta_bias (d,); initial_state (b, d, n); seq_idx (b, l) integer. Floating arrays are
  float32, bfloat16 or float16 (the kernels compute in float32; float64 has no kernel path:
  use ``mamba_jax.ops.selective_scan`` with an XLA ``impl``). Complex A is not supported by
  the kernels: use ``impl="chunked"``.

  Returns:
    The sizes (b, l, d, n, g).
  """
  if jnp.ndim(u) != 3 or not _dtype_ok(u):
    raise ValueError(f"u must be float32/bfloat16/float16 with shape (batch, length, d_inner), "
                     f"got {_describe(u)}")
  batch, length, d_inner = jnp.shape(u)
  if length < 1:
    raise ValueError(f"u must have length >= 1, got {_describe(u)}")
  if jnp.shape(delta) != (batch, length, d_inner) or not _dtype_ok(delta):
    raise ValueError(f"delta must be float32/bfloat16/float16 with u's shape "
                     f"{(batch, length, d_inner)}, got {_describe(delta)}")
  if jnp.iscomplexobj(A):
    raise ValueError(f"A has complex dtype {jnp.result_type(A)}: the Pallas selective-scan "
                     "kernels support real A only; use mamba_jax.ops.selective_scan(..., "
                     "impl=\"chunked\") for complex A")
  if jnp.ndim(A) != 2 or jnp.shape(A)[0] != d_inner or not _dtype_ok(A):
    raise ValueError(f"A must be float32/bfloat16/float16 with shape (d_inner, d_state) = "
                     f"({d_inner}, n), got {_describe(A)}")
  d_state = jnp.shape(A)[1]
  groups = None
  for name, x in (("B", B), ("C", C)):
    if jnp.iscomplexobj(x):
      raise ValueError(f"{name} has complex dtype {jnp.result_type(x)}: the Pallas kernels "
                       "support real inputs only; use impl=\"chunked\"")
    shape = tuple(jnp.shape(x))
    ok = _dtype_ok(x) and shape[:2] == (batch, length) and shape[-1] == d_state and (
        len(shape) == 3 or (len(shape) == 4 and shape[2] > 0 and d_inner % shape[2] == 0))
    if not ok:
      raise ValueError(
          f"{name} must be float32/bfloat16/float16 with shape (batch, length, d_state) = "
          f"({batch}, {length}, {d_state}) or (batch, length, groups, d_state) with groups "
          f"dividing d_inner={d_inner}, got {_describe(x)}")
    g = 1 if len(shape) == 3 else shape[2]
    if groups is not None and g != groups:
      raise ValueError(f"B and C must have the same number of groups, got B {_describe(B)} "
                       f"and C {_describe(C)}")
    groups = g
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and (jnp.shape(x) != (d_inner,) or not _dtype_ok(x)):
      raise ValueError(f"{name} must be float32/bfloat16/float16 with shape (d_inner,) = "
                       f"({d_inner},), got {_describe(x)}")
  if z is not None and (jnp.shape(z) != (batch, length, d_inner) or not _dtype_ok(z)):
    raise ValueError(f"z must be float32/bfloat16/float16 with u's shape "
                     f"{(batch, length, d_inner)}, got {_describe(z)}")
  if initial_state is not None and (
      jnp.shape(initial_state) != (batch, d_inner, d_state) or not _dtype_ok(initial_state)):
    raise ValueError(f"initial_state must be real float32/bfloat16/float16 with shape "
                     f"(batch, d_inner, d_state) = {(batch, d_inner, d_state)}, got "
                     f"{_describe(initial_state)}")
  if seq_idx is not None and (jnp.shape(seq_idx) != (batch, length)
                              or not jnp.issubdtype(jnp.result_type(seq_idx), jnp.integer)):
    raise ValueError(f"seq_idx must be integer with shape (batch, length) = {(batch, length)}, "
                     f"got {_describe(seq_idx)}")
  for name, flag in (("delta_softplus", delta_softplus),
                     ("return_final_state", return_final_state)):
    if flag not in (False, True):
      raise ValueError(f"{name}={flag!r} must be False or True")
  return ScanDims(batch, length, d_inner, d_state, groups)


def decay_keep(seq_idx: jax.Array | None, batch: int, length: int,
               padded_length: int) -> jax.Array | None:
  """keep (b, padded_length) float32: 0 where the decay t−1 → t is cut, else 1.

  The decay into position t is zeroed where seq_idx[t] != seq_idx[t−1], with a virtual
  seq_idx[−1] = 0 (so a row whose ids start above 0 ignores ``initial_state``), as the SSD op
  does. Padding positions keep their decay (1 there: they carry the state unchanged).
  None when ``seq_idx`` is None.
  """
  if seq_idx is None:
    return None
  seq = seq_idx.astype(jnp.int32)
  prev = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), seq[:, :-1]], axis=1)
  keep = (seq == prev).astype(jnp.float32)
  return jnp.pad(keep, [(0, 0), (0, padded_length - length)], constant_values=1.0)


def softplus(x: jax.Array) -> jax.Array:
  """log(1 + eˣ) = max(x, 0) + log1p(e^−|x|), without overflow (float32 in kernels)."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid(x: jax.Array) -> jax.Array:
  """σ(x) = 1 / (1 + e^−x) (d softplus / dx); e^−x = inf gives 0, never NaN."""
  return 1.0 / (1.0 + jnp.exp(-x))


def silu_and_grad(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(silu(z), silu'(z)) = (z σ(z), σ(z) (1 + z (1 − σ(z))))."""
  s = sigmoid(z)
  return z * s, s * (1.0 + z * (1.0 - s))


# The refs every selective-scan backward kernel receives (Triton GPU, Mosaic GPU, TPU), in
# order: (name, the flag that makes an optional one present, or None for always present).
BWD_REFS = (("u", None), ("delta", None), ("a", None), ("b", None), ("c", None),
            ("d", "has_d"), ("z", "has_z"), ("bias", "has_bias"), ("keep", "has_keep"),
            ("states", None), ("dout", None), ("dfinal", None), ("du", None), ("ddelta", None),
            ("dz", "has_z"), ("db", None), ("dc", None), ("da", None), ("dd", "has_d"),
            ("dbias", "has_bias"), ("dinit", None))


def split_bwd_refs(refs, *, has_d: bool, has_z: bool, has_bias: bool, has_keep: bool
                   ) -> tuple[tuple, list]:
  """A backward kernel's refs by ``BWD_REFS``: a tuple of the 21 refs in that order (None for
  an optional one that is absent) and the refs after them (the kernel's scratch)."""
  present = dict(has_d=has_d, has_z=has_z, has_bias=has_bias, has_keep=has_keep)
  refs = list(refs)
  taken = tuple(refs.pop(0) if flag is None or present[flag] else None for _, flag in BWD_REFS)
  return taken, refs


def split_bwd_outputs(outs, *, has_d: bool, has_z: bool, has_bias: bool) -> tuple:
  """A backward launch's outputs (the output refs of ``BWD_REFS``, absent ones left out) as
  (du, ddelta, dz, db, dc, da, dd, dbias, dinit), None for an absent optional one."""
  present = dict(has_d=has_d, has_z=has_z, has_bias=has_bias)
  outs = list(outs)
  taken = tuple(outs.pop(0) if flag is None or present[flag] else None
                for _, flag in BWD_REFS[BWD_REFS.index(("du", None)):])
  if outs:
    raise ValueError(f"{len(outs)} backward outputs left over: the launch's outputs do not "
                     "follow BWD_REFS")
  return taken
