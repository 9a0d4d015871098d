"""Evaluation of trained language models: zero-shot tasks (mamba_jax.evaluation.zero_shot)."""
