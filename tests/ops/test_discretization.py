"""Tests of mamba_jax.ops.discretization: exact ZOH and Mamba's simplified rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.discretization import simplified_discretize, zoh_discretize
from tests.numerics import assert_close

TOL = {jnp.float64: 1e-13, jnp.float32: 1e-6}


def test_zoh_one_state_by_hand():
  # Δ = 0.5, A = −2, B = 3: ΔA = −1.
  # Ā = e^{−1} = 0.36787944117144233
  # B̄ = (e^{−1} − 1)/(−2) · 3 = 0.6321205588285577 / 2 · 3 = 0.9481808382428365
  # simplified: B̄ = ΔB = 1.5
  delta, A, B = np.array([0.5]), np.array([[-2.0]]), np.array([3.0])
  a_bar, b_bar = zoh_discretize(delta, A, B)
  np.testing.assert_allclose(a_bar, [[0.36787944117144233]], rtol=1e-15)
  np.testing.assert_allclose(b_bar, [[0.9481808382428365]], rtol=1e-15)
  a_simple, b_simple = simplified_discretize(delta, A, B)
  np.testing.assert_allclose(a_simple, [[0.36787944117144233]], rtol=1e-15)
  np.testing.assert_allclose(b_simple, [[1.5]], rtol=1e-15)


def _expm_reference(delta, A, B):
  """Ā, B̄ from expm([[ΔA, ΔB], [0, 0]]) per (leading index, channel): diagonal and last column."""
  *lead, d = delta.shape
  n = A.shape[1]
  m = np.zeros((*lead, d, n + 1, n + 1), np.result_type(A, B))
  dA = delta[..., None] * A  # (..., d, n)
  m[..., np.arange(n), np.arange(n)] = dA
  m[..., :n, n] = delta[..., None] * B[..., None, :]
  e = np.asarray(jax.scipy.linalg.expm(jnp.asarray(m)))  # batched over (..., d)
  return np.diagonal(e, axis1=-2, axis2=-1)[..., :n], e[..., :n, n]


@pytest.mark.parametrize("is_complex", [False, True])
def test_zoh_matches_augmented_matrix_exponential(is_complex):
  rng = np.random.default_rng(0)
  delta = rng.uniform(0.01, 1.0, (2, 3))  # (b, d)
  A = -np.exp(rng.standard_normal((3, 4)))  # (d, n)
  B = rng.standard_normal((2, 4))  # (b, n)
  if is_complex:
    A = A + 1j * np.pi * np.arange(4)
    B = B + 1j * rng.standard_normal((2, 4))
  A[0, 0] = 0.0  # the limit A -> 0 sits inside the same case
  a_bar, b_bar = zoh_discretize(delta, A, B)
  a_ref, b_ref = _expm_reference(delta, A, B)
  assert a_bar.shape == b_bar.shape == (2, 3, 4)
  # expm's own (Padé, scaling and squaring) error is ~1e-11 for the complex case.
  assert_close(a_bar, a_ref, 1e-10, "Ā")
  assert_close(b_bar, b_ref, 1e-10, "B̄")


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_zoh_small_a_limit_and_taylor_seam(dtype):
  # Around ΔA = 0 and around the Taylor/expm1 seam (|ΔA| = 1e-3) B̄/(ΔB) = expm1(x)/x, which
  # numpy evaluates without cancellation for x ≠ 0; at x = 0 it is exactly 1.
  x = np.array([0.0, 1e-12, -1e-7, 9.999e-4, -9.999e-4, 1.0001e-3, -1.0001e-3, 0.3, -5.0])
  delta = np.full((1,), 0.5)
  A = (x / 0.5)[None, :]
  B = np.full((len(x),), 2.0)
  a_bar, b_bar = zoh_discretize(jnp.asarray(delta, dtype), jnp.asarray(A, dtype),
                                jnp.asarray(B, dtype))
  assert b_bar.dtype == dtype
  phi = np.where(x == 0, 1.0, np.expm1(x) / np.where(x == 0, 1.0, x))
  expected = 0.5 * 2.0 * phi
  np.testing.assert_allclose(np.asarray(b_bar, np.float64)[0], expected, rtol=TOL[dtype])
  np.testing.assert_allclose(np.asarray(a_bar, np.float64)[0], np.exp(x), rtol=TOL[dtype])
  np.testing.assert_array_equal(np.asarray(b_bar)[0, 0], 0.5 * 2.0)  # A = 0: exactly ΔB


def test_zoh_gradient_at_zero_a():
  # B̄ = Δ φ₁(ΔA) B with φ₁(x) = 1 + x/2 + …, so ∂B̄/∂A at A = 0 is Δ² B / 2 and
  # ∂B̄/∂Δ is B; here Δ = 0.5, B = 3: ∂B̄/∂A = 0.375, ∂B̄/∂Δ = 3.
  grad_a, grad_delta = jax.grad(
      lambda a, d: zoh_discretize(d, a, jnp.array([3.0]))[1].sum(), argnums=(0, 1))(
          jnp.zeros((1, 1)), jnp.array([0.5]))
  np.testing.assert_allclose(grad_a, [[0.375]], rtol=1e-14)
  np.testing.assert_allclose(grad_delta, [3.0], rtol=1e-14)


def test_simplified_broadcasts_grouped_layout():
  # delta (b, g, p), A (g, p, n), B (b, g, n) -> (b, g, p, n); checked against elementwise loops.
  rng = np.random.default_rng(1)
  delta = rng.uniform(0.01, 1.0, (2, 3, 2))
  A = -np.exp(rng.standard_normal((3, 2, 4)))
  B = rng.standard_normal((2, 3, 4))
  a_bar, b_bar = simplified_discretize(delta, A, B)
  a_ref = np.exp(delta[..., None] * A[None])
  b_ref = np.einsum("bgp,bgn->bgpn", delta, B)
  assert_close(a_bar, a_ref, 1e-15, "Ā")
  assert_close(b_bar, b_ref, 1e-15, "B̄")
  _, zoh_b = zoh_discretize(delta, A, B)
  assert_close(zoh_b, np.einsum("bgpn,bgn->bgpn", np.expm1(delta[..., None] * A) / A, B),
               1e-13, "grouped ZOH B̄")
