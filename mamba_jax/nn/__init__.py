"""Flax NNX modules: parameters and calls into mamba_jax.ops."""

from mamba_jax.nn.block import Block, Norm
from mamba_jax.nn.h3 import H3Mixer, SSMNoGate
from mamba_jax.nn.lm import MambaLM, MixerModel, weight_decay_mask
from mamba_jax.nn.mamba1 import Mamba1Mixer, Mamba1State

__all__ = ["Block", "H3Mixer", "Mamba1Mixer", "Mamba1State", "MambaLM", "MixerModel", "Norm",
           "SSMNoGate", "weight_decay_mask"]
