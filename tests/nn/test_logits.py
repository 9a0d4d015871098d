"""logits_product: the plain float32-output product forward, a compute-dtype backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.nn.logits import logits_product
from tests.numerics import assert_close

SPECS = {"vd": "...d,vd->...v", "dv": "...d,dv->...v"}


def _operands(layout, dtype, shape=(2, 3, 16), vocab=40, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  w_shape = (vocab, shape[-1]) if layout == "vd" else (shape[-1], vocab)
  w = jax.random.normal(kw, w_shape, jnp.float32).astype(dtype)
  g = jax.random.normal(kg, (*shape[:-1], vocab), jnp.float32)
  return x, w, g


def _grads(fn, x, w, g):
  _, vjp = jax.vjp(fn, x, w)
  return vjp(g)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_float32_equals_the_plain_product_and_its_autodiff(layout):
  x, w, g = _operands(layout, jnp.float32)
  plain = lambda a, b: jnp.einsum(SPECS[layout], a, b, preferred_element_type=jnp.float32)
  ours = lambda a, b: logits_product(a, b, layout)
  np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(plain(x, w)))
  for got, want, name in zip(_grads(ours, x, w, g), _grads(plain, x, w, g), ("dx", "dw")):
    assert got.dtype == want.dtype == jnp.float32
    assert_close(got, want, 1e-6, name)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_bfloat16_float32_logits_and_a_bfloat16_backward(layout):
  x, w, g = _operands(layout, jnp.bfloat16, seed=1)
  out = logits_product(x, w, layout)
  assert out.dtype == jnp.float32
  exact = lambda a, b: jnp.einsum(SPECS[layout], a.astype(jnp.float64), b.astype(jnp.float64))
  with jax.enable_x64(True):
    want_out = exact(x, w)
    want = _grads(exact, x.astype(jnp.float64), w.astype(jnp.float64), g.astype(jnp.float64))
  assert_close(out, want_out, 1e-6, "logits (float32 accumulation of bf16 operands)")
  grads = _grads(lambda a, b: logits_product(a, b, layout), x, w, g)
  for got, ref, name in zip(grads, want, ("dx", "dw")):
    assert got.dtype == jnp.bfloat16
    assert_close(got, ref, 1e-2, name)   # the cotangent rounded to bf16, products accumulated
  # The backward's products take bf16 operands: no float32 product in its HLO.
  text = jax.jit(lambda a, b, c: _grads(lambda p, q: logits_product(p, q, layout), a, b, c)
                 ).lower(x, w, g).as_text()
  operands = [ln.split(": (")[-1].split(") ->")[0] for ln in text.splitlines()
              if "dot_general" in ln]
  assert len(operands) >= 2 and not any("f32" in o for o in operands), operands


def test_bad_arguments_are_named():
  x, w, _ = _operands("vd", jnp.float32)
  with pytest.raises(ValueError, match="w_layout"):
    logits_product(x, w, "dd")
  with pytest.raises(ValueError, match="compute dtype"):
    logits_product(x, w.astype(jnp.bfloat16), "vd")
  with pytest.raises(ValueError, match=r"\(d, v\)"):
    logits_product(x, w, "dv")
