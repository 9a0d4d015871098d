"""mamba_jax: selective state space models (Mamba, Mamba-2) in JAX/Flax.

The public API, imported lazily so that ``import mamba_jax`` stays cheap (the checkpoint
converter pulls in orbax, the models flax):

  ops        selective_scan, selective_state_update, ssd, ssd_state_update, causal_conv1d,
             causal_conv1d_update, rms_norm, layer_norm, gated_rms_norm, zoh_discretize,
             simplified_discretize, softmax_cross_entropy_with_accuracy (mamba_jax.ops.*)
  models     MambaConfig, preset, MambaLM, weight_decay_mask         (mamba_jax.config, .nn)
  checkpoints load_pretrained, save_pretrained                       (mamba_jax.convert)
  decoding   generate                                                (mamba_jax.inference)
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "selective_scan": "mamba_jax.ops.selective_scan",
    "selective_state_update": "mamba_jax.ops.selective_state_update",
    "ssd": "mamba_jax.ops.ssd",
    "ssd_state_update": "mamba_jax.ops.ssd_state_update",
    "causal_conv1d": "mamba_jax.ops.causal_conv1d",
    "causal_conv1d_update": "mamba_jax.ops.causal_conv1d",
    "rms_norm": "mamba_jax.ops.norms",
    "layer_norm": "mamba_jax.ops.norms",
    "gated_rms_norm": "mamba_jax.ops.norms",
    "zoh_discretize": "mamba_jax.ops.discretization",
    "simplified_discretize": "mamba_jax.ops.discretization",
    "softmax_cross_entropy_with_accuracy": "mamba_jax.ops.cross_entropy",
    "MambaConfig": "mamba_jax.config",
    "preset": "mamba_jax.config",
    "MambaLM": "mamba_jax.nn.lm",
    "weight_decay_mask": "mamba_jax.nn.lm",
    "load_pretrained": "mamba_jax.convert",
    "save_pretrained": "mamba_jax.convert",
    "generate": "mamba_jax.inference.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'mamba_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
