"""SSD chunk states: one weighted outer-product sum per (batch, chunk, head), a Pallas GPU kernel.

Mamba-2 (Dao & Gu, 2024), Sec. 6 / Listing 1, step 2 ("intra-chunk states"):

  S[b, c, h] = sum_{s in chunk c} w[b, h, s] * x[b, s, h, :] (outer) B[b, s, g(h), :]

with w_s = exp(cs_last - cs_s) * dt_s (the decay from position s to the chunk end, times the
step). The same contraction with x -> dy, B -> C and w_t = exp(cs_t) gives the backward's
gradient of the state entering each chunk, d prev[b, c, h] = sum_t w_t dy_t (outer) C_t, so the
kernel is written once for both.

Backend: Pallas with the Triton lowering (``pl.pallas_call`` + ``triton.CompilerParams``); it
runs on CPU with ``interpret=True``. Matmuls accumulate in float32 on the tensor cores; float32
inputs use IEEE float32 products (no TF32).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes


def mm(a, b, contract_a: int, contract_b: int):
  """a @ b contracting ``a``'s axis ``contract_a`` with ``b``'s ``contract_b``; float32 out.

  Operands go to the tensor cores in their own dtype (bf16/f16); float32 operands use full
  float32 precision (Triton's default for float32 would be TF32).
  """
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _chunk_state_kernel(x_ref, b_ref, w_ref, out_ref, *, chunk_size: int, block_k: int):
  """One (b, c, h): x_ref (q, p), b_ref (q, n), w_ref (q,) float32 -> out_ref (p, n) float32."""
  p = x_ref.shape[-1]
  n = b_ref.shape[-1]

  def body(k, acc):
    rows = pl.ds(k * block_k, block_k)
    x = x_ref[rows, :]
    bw = (b_ref[rows, :].astype(jnp.float32) * w_ref[rows][:, None]).astype(b_ref.dtype)
    return acc + mm(x, bw, 0, 0)

  acc = lax.fori_loop(0, chunk_size // block_k, body, jnp.zeros((p, n), jnp.float32))
  out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("chunk_size", "blocks", "interpret"))
def chunk_state(x: jax.Array, b: jax.Array, w: jax.Array, *, chunk_size: int,
                blocks: SSDBlockSizes, interpret: bool = False) -> jax.Array:
  """Per-chunk weighted state sums, Mamba-2 Sec. 6 step 2.

  Args:
    x: (b, l, h, p), any float dtype; l a multiple of ``chunk_size``.
    b: (b, l, g, n), x's dtype; h a multiple of g (head i reads group i // (h // g)).
    w: (b, h, l) float32 weights per position.
    chunk_size: q.
    blocks: tile sizes (``block_k`` steps through the chunk).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    (b, c, h, p, n) float32: S[b, c, h] = sum_s w[b, h, s] x[b, s, h] (outer) b[b, s, g(h)].
  """
  batch, length, heads, head_dim = x.shape
  _, _, groups, state = b.shape
  if length % chunk_size:
    raise ValueError(f"{length=} must be a multiple of {chunk_size=}")
  if chunk_size % blocks.block_k:
    raise ValueError(f"{chunk_size=} must be a multiple of block_k={blocks.block_k}")
  if b.shape[:2] != (batch, length) or heads % groups:
    raise ValueError(f"b has shape {b.shape}; expected ({batch}, {length}, g, n) with g | {heads}")
  if w.shape != (batch, heads, length) or w.dtype != jnp.float32:
    raise ValueError(f"w has shape {w.shape} dtype {w.dtype}; expected "
                     f"({batch}, {heads}, {length}) float32")
  chunks = length // chunk_size
  per_group = heads // groups
  kernel = functools.partial(_chunk_state_kernel, chunk_size=chunk_size,
                             block_k=blocks.block_k)
  return pl.pallas_call(
      kernel,
      grid=(heads, chunks, batch),
      in_specs=[
          pl.BlockSpec((None, chunk_size, None, head_dim), lambda h, c, bi: (bi, c, h, 0)),
          pl.BlockSpec((None, chunk_size, None, state),
                       lambda h, c, bi: (bi, c, h // per_group, 0)),
          pl.BlockSpec((None, None, chunk_size), lambda h, c, bi: (bi, h, c)),
      ],
      out_specs=pl.BlockSpec((None, None, None, head_dim, state),
                             lambda h, c, bi: (bi, c, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state), jnp.float32),
      compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                               num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_chunk_state",
  )(x, b, w)
