"""``Linear``: flax's ``nnx.Linear`` whose one-row products stay matrix products on GPUs.

Decoding one sequence multiplies a single row x (1, k) by each weight (k, n). XLA's GPU
compiler rewrites a vector-matrix product with k·n below 10⁷ elements into a broadcast
multiply and a reduction (its ``DotStrengthReduction`` pass), and in the decoding loop the
multiply is emitted as its own kernel that writes the whole (k, n) product to memory before
the reduction reads it back: three passes over a weight-sized array instead of one. Measured
on an H100 (``scripts/profile_decode.py``, mamba-1.4b at batch 1): out_proj (k 4096, n 2048)
took 0.8 ms of the 3.5 ms of kernel time per token that way. Two rows are not a vector, so
the product stays a GEMM that reads the weight once: ``Linear`` pads a single row with a zero
row and returns the first. Parameters, initialisation and every other shape are exactly
``nnx.Linear``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# k · n from which a single row is padded. From 2^20 down to 2^16 it also takes mamba-1.4b's
# x_proj (k 4096, n 160) and dt_proj (k 128, n 4096): batch-1 decoding went from 2.54 to 2.38 ms
# per token on an H100 (scripts/profile_decode.py, one call), x_proj's reduction (6.4 µs per
# layer) becoming a 2.7 µs GEMM. Below it the rewritten form is as cheap and fuses with its
# neighbours (one kernel fewer).
MIN_PADDED_WEIGHT = 1 << 16


class Linear(nnx.Linear):
  """``nnx.Linear`` (kernel (in_features, out_features)); an input of shape (1, in_features)
  is computed as the first row of a two-row product when in · out ≥ MIN_PADDED_WEIGHT."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if (inputs.ndim == 2 and inputs.shape[0] == 1
        and self.in_features * self.out_features >= MIN_PADDED_WEIGHT):
      return super().__call__(jnp.pad(inputs, ((0, 1), (0, 0))))[:1]
    return super().__call__(inputs)
