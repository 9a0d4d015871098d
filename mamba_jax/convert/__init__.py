"""Checkpoint conversion: HF transformers and mamba_ssm checkpoints to and from ``MambaLM``.

``load_pretrained(dir)`` reads a local HF (config.json + model.safetensors), mamba_ssm
(config.json + pytorch_model.bin) or orbax checkpoint; ``save_pretrained(model, dir,
format=...)`` writes one. See :mod:`mamba_jax.convert.pretrained`.
"""

from mamba_jax.convert.pretrained import (FORMATS, detect_format, load_pretrained, read_config,
                                          save_pretrained)

__all__ = ["FORMATS", "detect_format", "load_pretrained", "read_config", "save_pretrained"]
