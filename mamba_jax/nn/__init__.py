"""Flax NNX modules: parameters and calls into mamba_jax.ops."""
