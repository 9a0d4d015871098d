"""Inference: decoding caches, parallel prefill, the compiled decoding loop, sampling and
``generate`` for (padded) batches."""

from mamba_jax.inference.cache import (Cache, astype_states, cache_nbytes, init_cache,
                                       state_nbytes)
from mamba_jax.inference.decode import decode, decode_step
from mamba_jax.inference.generate import generate, jit_prefill
from mamba_jax.inference.prefill import prefill
from mamba_jax.inference.sampling import SamplingParams, process_logits, sample

__all__ = ["Cache", "SamplingParams", "astype_states", "cache_nbytes", "decode", "decode_step",
           "generate", "init_cache", "jit_prefill", "prefill", "process_logits", "sample",
           "state_nbytes"]
