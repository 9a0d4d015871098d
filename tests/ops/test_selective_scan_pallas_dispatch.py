"""``selective_scan(impl="pallas")`` dispatch: the interpreted kernels on CPU equal the oracle.

The kernels themselves are tested in depth in tests/kernels/; here only the wiring of the op.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from tests.numerics import assert_close


def test_pallas_matches_oracle_forward_and_final_state():
  rng = np.random.default_rng(0)
  b, l, e, n = 1, 21, 8, 16
  f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  args = (f(b, l, e), f(b, l, e, scale=0.5), -jnp.exp(f(e, n, scale=0.5)), f(b, l, 2, n),
          f(b, l, 2, n))
  kw = dict(D=f(e), z=f(b, l, e), delta_bias=f(e, scale=0.5), delta_softplus=True,
            initial_state=f(b, e, n), return_final_state=True)
  y, h = selective_scan(*args, **kw, impl="pallas")
  y_ref, h_ref = selective_scan(*(a.astype(jnp.float64) for a in args),
                                **{k: (v.astype(jnp.float64) if hasattr(v, "astype") else v)
                                   for k, v in kw.items()}, impl="sequential")
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(h, h_ref, 1e-5, "final state")


def test_pallas_refuses_complex_A_naming_the_fallback():
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.standard_normal((1, 4, 2)), jnp.float32)
  A = jnp.full((2, 16), -0.5 + 1j, jnp.complex64)
  B = jnp.ones((1, 4, 16), jnp.complex64)
  with pytest.raises(ValueError, match="chunked"):
    selective_scan(u, u, A, B, B, impl="pallas")


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="on a Hopper GPU auto runs the kernels (test_auto_rule covers that)")
def test_auto_is_chunked_on_cpu():
  rng = np.random.default_rng(2)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  args = (f(1, 9, 4), f(1, 9, 4), -jnp.exp(f(4, 16)), f(1, 9, 16), f(1, 9, 16))
  np.testing.assert_array_equal(selective_scan(*args), selective_scan(*args, impl="chunked"))


@pytest.mark.parametrize("where, hopper, A_dtype, expected", [
    ("gpu", True, jnp.float32, "pallas"),
    ("gpu", True, jnp.complex64, "chunked"),  # the kernels take a real A only
    ("gpu", True, jnp.float64, "chunked"),
    ("gpu", False, jnp.float32, "chunked"),  # pre-Hopper GPU
    ("tpu", False, jnp.float32, "chunked"),  # TPU kernels are opt-in until timed on a TPU
])
def test_auto_rule(monkeypatch, where, hopper, A_dtype, expected):
  from mamba_jax.ops import selective_scan as module
  monkeypatch.setattr(module, "platform", lambda: where)
  monkeypatch.setattr(module, "is_hopper_or_newer", lambda: hopper)
  u = jnp.ones((1, 4, 2), jnp.float32)
  assert module._auto(u=u, delta=u, A=jnp.ones((2, 16), A_dtype), B=None, C=None) == expected


@pytest.mark.parametrize("hopper, e, n, expected", [
    (True, 128, 16, "mosaic"),
    (True, 96, 16, "triton"),   # d_inner / groups not a multiple of the Mosaic kernels' 64
    (True, 128, 12, "triton"),  # d_state not a multiple of 8
    (False, 128, 16, "triton"),  # pre-Hopper GPU
])
def test_gpu_backend_rule(monkeypatch, hopper, e, n, expected):
  """On a GPU, impl="pallas" runs the Mosaic GPU kernels on Hopper where they take the sizes."""
  from mamba_jax.ops import selective_scan_pallas as module
  from pallas_kernels.gpu import selective_scan as kernels
  chosen = []
  monkeypatch.setattr(module, "platform", lambda: "gpu")
  monkeypatch.setattr(module, "is_hopper_or_newer", lambda: hopper)
  monkeypatch.setattr(kernels, "selective_scan_pallas_gpu",
                      lambda *a, backend, **k: chosen.append(backend))
  u = jnp.ones((1, 4, e), jnp.bfloat16)
  B = jnp.ones((1, 4, n), jnp.bfloat16)
  module.selective_scan_pallas(u, u, -jnp.ones((e, n)), B, B, None, None, None, True, None,
                               False)
  assert chosen == [expected]
