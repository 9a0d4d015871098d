"""Cache shapes and dtypes per layer kind; state size against context length."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.inference.cache import (Cache, astype_states, cache_nbytes, init_cache,
                                       state_nbytes)
from mamba_jax.nn.attention import KVCache
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1State
from mamba_jax.nn.mamba2 import Mamba2State


def test_mamba1_cache_shapes_and_dtypes():
  # tiny Mamba1: d_model 32, expand 2 -> e 64, d_state 4, d_conv 4.
  cache = init_cache(MambaConfig.tiny("Mamba1"), 3, 20, jnp.bfloat16)
  assert isinstance(cache, Cache) and cache.max_length == 20 and cache.batch == 3
  assert len(cache.layers) == 2
  for state in cache.layers:
    assert isinstance(state, Mamba1State)
    assert state.conv_state.shape == (3, 64, 3) and state.conv_state.dtype == jnp.bfloat16
    assert state.ssm_state.shape == (3, 64, 4) and state.ssm_state.dtype == jnp.float32


def test_hybrid_cache_shapes_and_dtypes():
  # tiny hybrid: Mamba2 (h = 64 / 16 = 4 heads, p 16, n 8, conv over 64 + 2·8 = 80
  # channels), attention (4 heads of 8), Mamba2.
  cache = init_cache(MambaConfig.tiny("hybrid"), 2, 9, jnp.float32)
  kinds = [type(s) for s in cache.layers]
  assert kinds == [Mamba2State, KVCache, Mamba2State]
  m2, kv = cache.layers[0], cache.layers[1]
  assert m2.conv_state.shape == (2, 80, 3) and m2.ssm_state.shape == (2, 4, 16, 8)
  assert kv.k.shape == kv.v.shape == (2, 9, 4, 8) and kv.k.dtype == jnp.float32
  assert kv.index.shape == () and kv.start.shape == (2,)
  assert all(not jnp.any(leaf) for leaf in jax.tree.leaves(cache))


def test_init_cache_from_model_uses_its_dtype():
  model = MambaLM(MambaConfig.tiny("Mamba2"), dtype=jnp.float64, param_dtype=jnp.float64,
                  rngs=nnx.Rngs(0))
  cache = init_cache(model, 1, 4)
  assert cache.layers[0].conv_state.dtype == jnp.float64
  assert cache.layers[0].ssm_state.dtype == jnp.float64


def test_state_size_constant_for_ssm_linear_for_attention():
  for kind in ("Mamba1", "Mamba2"):
    config = MambaConfig.tiny(kind)
    assert state_nbytes(config, 2, 16) == state_nbytes(config, 2, 4096)
  config = MambaConfig.tiny("attention")  # 2 layers, 4 kv heads of 8, float32 k and v
  per_slot = 2 * 2 * 2 * 4 * 8 * 4  # layers · (k, v) · batch · heads · head_dim · bytes
  assert state_nbytes(config, 2, 4096) - state_nbytes(config, 2, 16) == per_slot * 4080
  cache = init_cache(config, 2, 16)
  assert cache_nbytes(cache) == state_nbytes(config, 2, 16)


@pytest.mark.parametrize("args,match", [((0, 4), "batch"), ((1, 0), "max_length")])
def test_init_cache_validation(args, match):
  with pytest.raises(ValueError, match=match):
    init_cache(MambaConfig.tiny("Mamba1"), *args)
  with pytest.raises(ValueError, match="model_or_config"):
    init_cache("mamba", 1, 4)


def test_state_dtype_sets_the_ssm_states_only():
  # tiny hybrid: Mamba2 / attention / Mamba2 (shapes as above); tiny Mamba1: e 64, n 4.
  cache = init_cache(MambaConfig.tiny("hybrid"), 2, 9, jnp.float32, state_dtype=jnp.bfloat16)
  m2, kv = cache.layers[0], cache.layers[1]
  assert m2.ssm_state.shape == (2, 4, 16, 8) and m2.ssm_state.dtype == jnp.bfloat16
  assert m2.conv_state.dtype == jnp.float32  # conv states and KV caches keep the cache dtype
  assert kv.k.dtype == kv.v.dtype == jnp.float32
  mamba1 = MambaConfig.tiny("Mamba1")
  cache = init_cache(mamba1, 2, 9, jnp.bfloat16, state_dtype="float32")
  assert all(s.ssm_state.dtype == jnp.float32 and s.conv_state.dtype == jnp.bfloat16
             for s in cache.layers)
  # bf16 halves the SSM state: 2 layers · batch 2 · 64 · 4 elements, 4 -> 2 bytes each.
  assert (state_nbytes(mamba1, 2, 9) - state_nbytes(mamba1, 2, 9, state_dtype=jnp.bfloat16)
          == 2 * 2 * 64 * 4 * 2)


@pytest.mark.parametrize("bad", [jnp.int32, jnp.complex64, "nonsense", True, 16])
def test_state_dtype_must_be_a_real_floating_dtype(bad):
  with pytest.raises(ValueError, match="state_dtype must be a real floating dtype"):
    init_cache(MambaConfig.tiny("Mamba2"), 1, 4, state_dtype=bad)


def test_complex_state_needs_float32_or_wider():
  # s4d_lin is the complex A: its state is complex, and bfloat16 has no complex counterpart.
  config = MambaConfig.tiny("Mamba1")
  config = config.replace(ssm_cfg={**config.ssm_cfg, "A_init": "s4d_lin"})
  assert init_cache(config, 1, 4, state_dtype=jnp.float32).layers[0].ssm_state.dtype \
      == jnp.complex64
  with pytest.raises(ValueError, match="state_dtype=bfloat16 has no complex counterpart"):
    init_cache(config, 1, 4, state_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="state_dtype=bfloat16 has no complex counterpart"):
    astype_states(init_cache(config, 1, 4), jnp.bfloat16)


def test_astype_states_converts_the_ssm_states_only():
  cache = init_cache(MambaConfig.tiny("hybrid"), 2, 9)
  half = astype_states(cache, jnp.bfloat16)
  assert [type(s) for s in half.layers] == [type(s) for s in cache.layers]
  assert half.max_length == 9
  for before, after in zip(cache.layers, half.layers):
    if isinstance(after, KVCache):
      assert after is before
    else:
      assert after.ssm_state.dtype == jnp.bfloat16
      assert after.conv_state is before.conv_state
  with pytest.raises(ValueError, match="state_dtype must be a real floating dtype"):
    astype_states(cache, "int8")
  with pytest.raises(ValueError, match="cache must be a Cache"):
    astype_states(cache.layers, jnp.bfloat16)
