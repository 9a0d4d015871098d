"""Decoding caches: the per-layer recurrent states of a :class:`MambaLM`, as one pytree.

A :class:`Cache` holds one entry per layer, the mixer's own state type:

  Mamba-1 / SSMNoGate / H3   Mamba1State  conv_state (b, e, w − 1), ssm_state (b, e, n)
  Mamba-2                    Mamba2State  conv_state (b, c, w − 1) over the conv channels
                                          in the mixer's grouped order ([x_g | B_g | C_g]
                                          group after group), ssm_state (b, h, p, n)
  attention                  KVCache      k, v (b, L, h_kv, p) preallocated to L =
                                          max_length slots, index () and start (b,)

Conv states and KV caches are in the cache dtype (the compute dtype by default). SSM states
are stored in ``state_dtype``: by default float32 at least (float64 for a float64 dtype,
complex for a complex A), exact; ``state_dtype=jnp.bfloat16`` stores them in bfloat16 as
mamba_ssm does for a bf16 model (its ``allocate_inference_cache`` takes the weights' dtype),
halving the bytes that every decoding step reads and writes, while every update is still
computed in float32 (the step reads the state into float32 and rounds the new one on write;
a prefill's final state is rounded once; a complex-A layer stores the complex counterpart,
so needs float32 or wider). An SSM layer's state has the same size whatever the context
length; a KV cache grows linearly with ``max_length``. :func:`cache_nbytes` /
:func:`state_nbytes` measure it (the latter without allocating: ``jax.eval_shape``).

Letter legend: b batch, L max_length, e d_inner, c conv channels, h heads, h_kv kv heads,
p head_dim, n d_state, w conv width.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mamba_jax.config import MambaConfig
from mamba_jax.nn.attention import KVCache
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1State
from mamba_jax.nn.mamba2 import Mamba2State
from mamba_jax.ops.checks import check_float_dtype, check_state_dtype

LayerState = Union[Mamba1State, Mamba2State, KVCache]


@struct.dataclass
class Cache:
  """The decoding state of every layer of a model (a pytree; ``max_length`` is static).

  layers: one :data:`LayerState` per layer, in layer order.
  max_length: the number of positions (prompt + generated) the cache has room for; only the
    attention layers' KV caches depend on it.
  """
  layers: tuple[LayerState, ...]
  max_length: int = struct.field(pytree_node=False)

  @property
  def batch(self) -> int:
    return jax.tree.leaves(self.layers[0])[0].shape[0]


def _check_positive(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def abstract_model(config: MambaConfig, dtype: Any = jnp.float32) -> MambaLM:
  """A MambaLM of ``config`` whose parameters are shapes only (no memory, no init work)."""
  return nnx.eval_shape(lambda: MambaLM(config, dtype=dtype, rngs=nnx.Rngs(0)))


def init_cache(model_or_config: MambaLM | MambaConfig, batch: int, max_length: int,
               dtype: Any = None, state_dtype: Any = None) -> Cache:
  """An empty cache (zero states, empty KV caches) for ``batch`` rows and ``max_length``.

  Args:
    model_or_config: the model, or its config (then the model's compute dtype is float32).
    batch: rows b.
    max_length: positions L to make room for (prompt + new tokens); the KV caches'
      length. SSM states do not depend on it.
    dtype: dtype of conv states and KV caches; the model's compute dtype when None.
    state_dtype: storage dtype of the SSM states, a real floating dtype; None: float32 (or
      wider, see the module docstring), exact. E.g. jnp.bfloat16 (mamba_ssm's choice for a
      bf16 model): half the state traffic per step, updates still computed in float32.

  Returns:
    A :class:`Cache`.
  """
  if isinstance(model_or_config, MambaConfig):
    model = abstract_model(model_or_config)
  elif isinstance(model_or_config, MambaLM):
    model = model_or_config
  else:
    raise ValueError("model_or_config must be a MambaLM or a MambaConfig, got "
                     f"{type(model_or_config).__name__}")
  _check_positive("batch", batch)
  _check_positive("max_length", max_length)
  return Cache(layers=tuple(model.init_state(batch, max_length, dtype, state_dtype)),
               max_length=max_length)


def astype_states(cache: Cache, state_dtype: Any) -> Cache:
  """The cache with its SSM states stored in ``state_dtype`` (rounded once; conv states and
  KV caches unchanged); a complex state becomes the complex counterpart (float32 or wider).

  A float32-state prefill converted this way holds exactly what ``prefill(...,
  state_dtype=state_dtype)`` returns (that prefill also computes in float32 and rounds its
  final states once), so one compiled prefill serves several state dtypes.
  """
  if not isinstance(cache, Cache):
    raise ValueError(f"cache must be a Cache (init_cache or prefill), got "
                     f"{type(cache).__name__}")
  check_float_dtype("state_dtype", state_dtype)

  def convert(layer: LayerState) -> LayerState:
    if not isinstance(layer, (Mamba1State, Mamba2State)):
      return layer
    dtype = check_state_dtype("state_dtype", state_dtype, jnp.iscomplexobj(layer.ssm_state))
    return layer.replace(ssm_state=layer.ssm_state.astype(dtype))

  return Cache(layers=tuple(convert(layer) for layer in cache.layers),
               max_length=cache.max_length)


def check_cache(cache: Any, model: MambaLM, batch: Optional[int] = None) -> None:
  """Raises ValueError unless ``cache`` is a Cache with one state per layer of ``model``."""
  if not isinstance(cache, Cache):
    raise ValueError(f"cache must be a Cache (init_cache or prefill), got "
                     f"{type(cache).__name__}")
  n_layer = len(model.backbone.layers)
  if len(cache.layers) != n_layer:
    raise ValueError(f"cache has {len(cache.layers)} layer states, the model has {n_layer} "
                     "layers")
  if batch is not None and cache.batch != batch:
    raise ValueError(f"cache holds batch {cache.batch}, expected batch {batch}")


def cache_nbytes(cache: Cache) -> int:
  """Bytes held by the cache's arrays (concrete or abstract)."""
  return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(cache))


def state_nbytes(config: MambaConfig, batch: int, max_length: int, dtype: Any = None,
                 state_dtype: Any = None) -> int:
  """Bytes of the decoding state for ``batch`` rows and ``max_length`` positions, from shapes
  alone (nothing is allocated): constant in max_length for SSM layers, linear for attention.
  ``dtype`` / ``state_dtype`` as in :func:`init_cache`."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, max_length, dtype, state_dtype))
  return cache_nbytes(shapes)
