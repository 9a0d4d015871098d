"""From an experiment config to a model: ``MambaConfig`` fields, row overrides, compute dtype.

An experiment config holds the model as plain ``MambaConfig`` fields (``config.model``) and each
model row of a table overrides some of them (``row.model``); ``ssm_cfg`` and ``attn_cfg`` are
merged key by key, so a row can say ``ssm_cfg={"layer": "H3"}`` and keep the shared d_state.
The compute dtype (``config.compute_dtype``: "float32" or "bfloat16") is the model's ``dtype``;
parameters stay float32. A config with a ``classifier`` field gets a sequence classifier.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx
import jax.numpy as jnp

from mamba_jax.config import MambaConfig
from mamba_jax.nn import lm
from mamba_jax.nn.classifier import SequenceClassifier

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_NESTED = ("ssm_cfg", "attn_cfg")


def _plain(value: Any) -> Any:
  """ConfigDicts / FrozenDicts / lists → plain dicts and tuples."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def merge_model_fields(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
  """``base`` updated by ``override``; ssm_cfg / attn_cfg merged one level deeper."""
  merged = _plain(base)
  for key, value in _plain(override).items():
    if key in _NESTED and isinstance(value, Mapping):
      merged[key] = {**merged.get(key, {}), **value}
    else:
      merged[key] = value
  return merged


def model_config(fields: Mapping[str, Any]) -> MambaConfig:
  """A validated ``MambaConfig`` from plain fields (ValueError naming a bad field)."""
  return MambaConfig.from_dict(_plain(fields))


def compute_dtype(name: str) -> Any:
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
  return COMPUTE_DTYPES[name]


def build_model(config: MambaConfig, *, dtype_name: str, seed: int,
                classifier: Mapping[str, Any] | None = None) -> nnx.Module:
  """``MambaLM(config)`` with float32 parameters and the given compute dtype.

  With ``classifier`` ({"num_classes": k, "pooling": "mean" | "last"}, an experiment's
  ``config.classifier``) a :class:`~mamba_jax.nn.classifier.SequenceClassifier` on that
  backbone instead, whose logits are (b, 1, k).
  """
  rngs, dtype = nnx.Rngs(seed), compute_dtype(dtype_name)
  if classifier:
    return SequenceClassifier(config, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                              **_plain(classifier))
  return lm.MambaLM(config, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def output_size(cfg: Any) -> int:
  """Logit entries the loss reads: ``classifier.num_classes``, else the task's vocabulary."""
  classifier = cfg.get("classifier")
  return int(classifier["num_classes"]) if classifier else int(cfg.task.vocab_size)


def weight_decay_mask(model: nnx.Module) -> Any:
  """The model's own mask (True: decayed), shaped like ``nnx.state(model, nnx.Param)``."""
  return lm.weight_decay_mask(model)
