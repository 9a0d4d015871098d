"""Pallas kernels for mamba_jax's ops (GPU: Mosaic GPU, TPU: Mosaic TPU).

This package never imports ``mamba_jax``; tests compare the two.
"""
