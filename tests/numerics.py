"""Numerical comparison helpers shared by the tests."""

import numpy as np


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| in float64 (complex-aware); 0 when both are zero."""
  a = np.asarray(actual).astype(np.complex128 if np.iscomplexobj(actual) else np.float64)
  e = np.asarray(expected).astype(np.complex128 if np.iscomplexobj(expected) else np.float64)
  if a.shape != e.shape:
    raise AssertionError(f"shape mismatch: {a.shape} vs {e.shape}")
  denom = np.linalg.norm(e.ravel())
  num = np.linalg.norm((a - e).ravel())
  return float(num / denom) if denom > 0 else float(num)


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
  """Asserts the norm-relative error is at most ``rtol`` and that ``actual`` is finite."""
  a = np.asarray(actual)
  if not np.all(np.isfinite(a)):
    raise AssertionError(f"{what}: non-finite values in result")
  err = relative_error(actual, expected)
  if not err <= rtol:
    raise AssertionError(f"{what}: relative error {err:.3e} > {rtol:.1e}")
