"""Argument validation shared by the ops.

Every public op validates its inputs up front and raises ``ValueError`` naming the argument,
its shape or dtype, and what was expected, so that a wrong call fails loudly instead of
broadcasting into a silently wrong result.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp


def check_rank(name: str, x: Any, ranks: int | Sequence[int], layout: str) -> None:
  """Raises unless ``x.ndim`` is one of ``ranks``; ``layout`` names the expected axes."""
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  if jnp.ndim(x) not in ranks:
    raise ValueError(
        f"{name} must have shape {layout} (rank {' or '.join(map(str, ranks))}), "
        f"got shape {tuple(jnp.shape(x))}")


def check_shape(name: str, x: Any, expected: Sequence[int | None], layout: str) -> None:
  """Raises unless ``x.shape`` matches ``expected`` (``None`` matches any size)."""
  shape = tuple(jnp.shape(x))
  if len(shape) != len(expected) or any(
      e is not None and s != e for s, e in zip(shape, expected)):
    want = tuple("*" if e is None else e for e in expected)
    raise ValueError(f"{name} must have shape {layout} = {want}, got shape {shape}")


def check_floating(name: str, x: Any, allow_complex: bool = False) -> None:
  """Raises unless ``x`` has a floating (or, if allowed, complex) dtype."""
  dtype = jnp.result_type(x)
  ok = jnp.issubdtype(dtype, jnp.floating) or (
      allow_complex and jnp.issubdtype(dtype, jnp.complexfloating))
  if not ok:
    kinds = "a floating or complex" if allow_complex else "a floating"
    raise ValueError(f"{name} must have {kinds} dtype, got {dtype}")


def check_integer(name: str, x: Any) -> None:
  """Raises unless ``x`` has an integer dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {dtype}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
  """Raises unless ``value % divisor == 0``."""
  if divisor <= 0 or value % divisor:
    raise ValueError(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def check_float_dtype(name: str, value: Any) -> jnp.dtype:
  """``value`` as a real floating ``jnp.dtype`` (bfloat16, float16, float32, float64);
  raises ValueError for anything else (ints, complex, strings that name no dtype)."""
  try:
    dtype = None if value is None else jnp.dtype(value)  # np.dtype(None) is float64
  except TypeError:
    dtype = None
  if isinstance(value, bool) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a real floating dtype (e.g. jnp.bfloat16 or "
                     f"jnp.float32), got {value!r}")
  return dtype


def check_state_dtype(name: str, value: Any, is_complex: bool) -> jnp.dtype:
  """The storage dtype of an SSM state asked for as ``value`` (a real floating dtype): itself,
  or its complex counterpart for a complex state (complex64 / complex128; bfloat16 and
  float16 have none, so they raise)."""
  real = check_float_dtype(name, value)
  if not is_complex:
    return real
  if real.itemsize < 4:
    raise ValueError(f"{name}={real} has no complex counterpart for a complex-A layer's "
                     "state: pass float32, float64 or None")
  return jnp.promote_types(real, jnp.complex64)


def is_concrete(x: Any) -> bool:
  """True when ``x``'s values are known now (not a tracer inside jit/grad/vmap).

  Value checks (e.g. "A must be negative") run only on concrete inputs; under ``jax.jit`` the
  values are unknown and the check is skipped.
  """
  import jax  # local: keep this module importable without initialising a backend
  return not isinstance(x, jax.core.Tracer)
