"""``ssd(impl="pallas")`` dispatch: the interpreted kernels on CPU equal the oracle; ``auto``.

The kernels themselves are tested in depth in tests/kernels/; here only the wiring of the op.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops import ssd_pallas
from mamba_jax.ops.ssd import ssd
from tests.numerics import assert_close


def _inputs(rng, b=1, l=40, h=2, p=16, g=1, n=16, dtype=jnp.float32):
  f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
  return dict(x=f(b, l, h, p), dt=f(b, l, h, scale=0.5), A=-jnp.exp(f(h, scale=0.5)).astype(
      jnp.float32), B=f(b, l, g, n), C=f(b, l, g, n))


def test_pallas_on_cpu_runs_interpreted_kernels_and_matches_oracle():
  rng = np.random.default_rng(0)
  args = _inputs(rng)
  z = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
  kw = dict(chunk_size=16, D=jnp.ones((2,), jnp.float32), z=z,
            dt_bias=jnp.zeros((2,), jnp.float32), dt_softplus=True, return_final_states=True)
  y, h = ssd(**args, **kw, impl="pallas")
  f64 = {k: v.astype(jnp.float64) for k, v in args.items()}
  y_ref, h_ref = ssd(**f64, **{**kw, "z": z.astype(jnp.float64)}, impl="sequential")
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(h, h_ref, 1e-5, "final states")


def test_auto_is_chunked_off_hopper():
  if jax.default_backend() == "gpu":
    pytest.skip("the auto rule differs on GPUs")
  args = _inputs(np.random.default_rng(1), l=20)
  np.testing.assert_array_equal(ssd(**args, chunk_size=16),
                                ssd(**args, chunk_size=16, impl="chunked"))


@pytest.mark.parametrize("change, reason", [
    (dict(dtype=jnp.float64), "x dtype float64"),
    (dict(p=24), "head_dim=24"),
    (dict(n=8), "d_state=8"),
])
def test_supports_names_what_the_kernels_cannot_take(change, reason):
  args = _inputs(np.random.default_rng(2), l=8, **change)
  ok, why = ssd_pallas.supports(args["x"], args["B"], args["C"], None, 16)
  assert not ok and reason in why


def test_supports_chunk_and_mixed_dtypes():
  args = _inputs(np.random.default_rng(3), l=8)
  assert ssd_pallas.supports(args["x"], args["B"], args["C"], None, 64) == (True, "")
  assert "chunk_size=48" in ssd_pallas.supports(args["x"], args["B"], args["C"], None, 48)[1]
  ok, why = ssd_pallas.supports(args["x"], args["B"].astype(jnp.bfloat16), args["C"], None, 16)
  assert not ok and "x's dtype" in why
