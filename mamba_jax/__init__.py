"""mamba_jax: selective state space models (Mamba, Mamba-2) in JAX/Flax."""

__version__ = "0.1.0"
