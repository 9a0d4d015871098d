"""GatedMLP (SwiGLU) against the explicit formula y·silu(gate) of its own parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.mlp import GatedMLP, hidden_size
from tests.numerics import assert_close

TOLS = {jnp.float64: 1e-12, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _functional(model):
  """(pure parameter dict, apply(params, x)) for jax.vjp over the parameters."""
  graphdef, state = nnx.split(model, nnx.Param)

  def apply(params, x):
    state_copy = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(state_copy, params)
    return nnx.merge(graphdef, state_copy)(x)

  return nnx.to_pure_dict(state), apply


def _reference(params, x):
  """out = (x·W1[:, :f] + b1) · silu(x·W1[:, f:] + b1) · W2 + b2, in float64."""
  x = x.astype(jnp.float64)
  w1 = params["fc1"]["kernel"].astype(jnp.float64)
  w2 = params["fc2"]["kernel"].astype(jnp.float64)
  h = x @ w1 + (params["fc1"]["bias"] if "bias" in params["fc1"] else 0.0)
  f = w2.shape[0]
  y, gate = h[..., :f], h[..., f:]
  silu = gate / (1.0 + jnp.exp(-gate))
  return (y * silu) @ w2 + (params["fc2"]["bias"] if "bias" in params["fc2"] else 0.0)


def test_hidden_size_rounding():
  # int(8·96/3) = 256 is a multiple of 128; int(8·100/3) = 266 rounds up to 384.
  assert hidden_size(96, None, 128) == 256
  assert hidden_size(100, None, 128) == 384
  assert hidden_size(100, 40, 16) == 48  # a given size is rounded up too, as in mamba_ssm
  with pytest.raises(ValueError, match="multiple_of"):
    hidden_size(8, None, 0)


@pytest.mark.parametrize("dtype,bias,out_features,shape", [
    (jnp.float64, True, None, (2, 7)),
    (jnp.float64, False, 5, (1, 1)),
    (jnp.float32, True, 6, (3,)),
])
def test_forward_and_gradients_match_formula(dtype, bias, out_features, shape):
  rng = np.random.default_rng(0)
  model = GatedMLP(12, hidden_features=20, out_features=out_features, multiple_of=8, bias=bias,
                   dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(1))
  assert model.fc1.kernel.shape == (12, 48) and model.hidden_features == 24
  params, apply = _functional(model)
  if bias:  # zero at init (mamba_ssm's _init_weights); make them count in the test
    params = jax.tree.map(lambda a: a, params)
    params["fc1"]["bias"] = jnp.asarray(rng.standard_normal(48), dtype)
    params["fc2"]["bias"] = jnp.asarray(rng.standard_normal(out_features or 12), dtype)
  x = jnp.asarray(rng.standard_normal((*shape, 12)), dtype)
  out, vjp = jax.vjp(apply, params, x)
  ref, vjp_ref = jax.vjp(_reference, jax.tree.map(lambda a: a.astype(jnp.float64), params),
                         x.astype(jnp.float64))
  assert out.dtype == dtype
  assert_close(out, ref, TOLS[dtype], "forward")
  cot = jnp.asarray(rng.standard_normal(out.shape), dtype)
  grads, grads_ref = vjp(cot), vjp_ref(cot.astype(jnp.float64))
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_ref)):
    assert_close(g, g_ref, TOLS[dtype], f"grad {jax.tree_util.keystr(path)}")


def test_bf16_close_to_float64_oracle():
  rng = np.random.default_rng(2)
  model = GatedMLP(16, hidden_features=32, multiple_of=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  params, apply = _functional(model)
  x = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.bfloat16)
  out = apply(params, x)
  assert out.dtype == jnp.bfloat16
  assert_close(out, _reference(params, x), TOLS[jnp.bfloat16], "bf16 forward")


def test_init_and_weight_decay_metadata():
  model = GatedMLP(64, hidden_features=128, bias=True, rngs=nnx.Rngs(0))
  k1, k2 = np.asarray(model.fc1.kernel[...]), np.asarray(model.fc2.kernel[...])
  # PyTorch's Linear default: U(±1/sqrt(fan_in)); its std is bound/sqrt(3).
  assert np.abs(k1).max() <= 1 / 8 and np.abs(k2).max() <= 1 / np.sqrt(128)
  np.testing.assert_allclose(k1.std(), 1 / 8 / np.sqrt(3), rtol=0.05)
  assert np.all(np.asarray(model.fc1.bias[...]) == 0)
  assert model.fc1.bias.get_metadata().get("no_weight_decay") is True
  assert not model.fc1.kernel.get_metadata().get("no_weight_decay", False)


def test_bad_input_raises():
  model = GatedMLP(8, hidden_features=8, multiple_of=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x"):
    model(jnp.ones((2, 7)))
  with pytest.raises(ValueError, match="floating"):
    model(jnp.ones((2, 8), jnp.int32))
