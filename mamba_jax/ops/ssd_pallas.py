"""The Pallas-kernel form of SSD: which kernel runs where, and which inputs it takes.

``impl="pallas"`` of :func:`mamba_jax.ops.ssd.ssd` lands here with the full raw signature:

  GPU  ``pallas_kernels.gpu.ssd.ssd_pallas_gpu``: forward by Mosaic GPU (wgmma) kernels on
       Hopper for bf16/fp16 inputs, else by the Triton-lowered kernels; backward by the
       Triton-lowered kernels
  TPU  ``pallas_kernels.tpu.ssd.ssd_pallas_tpu`` forward and backward (compiled; Mosaic TPU)
  CPU  the GPU kernels, forward and backward, in the Pallas interpreter: slow, for debugging
       and CI

The GPU kernels' own backward is the default everywhere. Its accuracy in bf16 is that of
tensor-core matmuls on bf16-rounded intermediates (as in mamba_ssm's Triton kernels): ~2e-3
relative for dx, ddt, dB, dC, but 1e-2 to 9e-2 for dA and ddt_bias, per-head sums in which the
terms cancel (the chunked form, computing in float32, gets ~1e-7 there). ``kernel_backward=False`` pairs the
kernels' forward with the chunked form's VJP instead (recomputing its forward): slower, kept as
a cross-check when debugging the backward kernels; tests exercise both pairings.

:func:`supports` says whether the kernels take given inputs (the ``auto`` rule uses it; an
explicit ``impl="pallas"`` on unsupported inputs raises the kernel's own ValueError).

Shape legend: b batch, l length, h heads, p head_dim, n d_state, g groups, q chunk size.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mamba_jax.ops.impl import platform, resolve_impl

KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _power_of_two_at_least_16(v: int) -> bool:
  return v >= 16 and not v & (v - 1)


def supports(x: jax.Array, B: jax.Array, C: jax.Array, z: jax.Array | None,
             chunk_size: int) -> tuple[bool, str]:
  """Whether the kernels take these inputs, and if not, why (for the ``auto`` log line).

  The GPU kernels tile p, n and the chunk q in powers of two >= 16 and read B, C and z in x's
  dtype; neither platform computes in float64.
  """
  if x.dtype not in KERNEL_DTYPES:
    return False, f"x dtype {x.dtype} (kernels take float32, bfloat16, float16)"
  if B.dtype != x.dtype or C.dtype != x.dtype or (z is not None and z.dtype != x.dtype):
    return False, "B, C and z must have x's dtype"
  p, n = x.shape[-1], B.shape[-1]
  for name, v in (("head_dim", p), ("d_state", n), ("chunk_size", chunk_size)):
    if not _power_of_two_at_least_16(v):
      return False, f"{name}={v} is not a power of two >= 16"
  return True, ""


def _gpu_kernels(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                 initial_states, seq_idx, interpret):
  from pallas_kernels.gpu.ssd import ssd_pallas_gpu  # pylint: disable=g-import-not-at-top
  # The backward's dB / dC kernels: "shared_w" (the faster on an H100, see ssd_pallas_gpu)
  # unless ``resolve_auto_as(ssd_gpu_bwd="per_head")`` says otherwise.
  bwd = resolve_impl("ssd_gpu_bwd", "auto", ("per_head", "shared_w"), lambda: "shared_w")
  return ssd_pallas_gpu(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                        initial_states, seq_idx, True, interpret=interpret, bwd=bwd)


def _kernel_forward_reference_backward(reference: Callable[..., tuple[jax.Array, jax.Array]],
                                       chunk_size, dt_softplus, dt_limit, interpret):
  """The GPU kernels' forward with ``reference``'s VJP (same full signature) as its backward."""

  def run_reference(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    return reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                     initial_states, seq_idx)

  @jax.custom_vjp
  def run(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    return _gpu_kernels(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                        initial_states, seq_idx, interpret)

  def fwd(*args):
    return run(*args), args

  def bwd(args, cotangents):
    *differentiable, seq_idx = args
    _, vjp = jax.vjp(lambda *d: run_reference(*d, seq_idx), *differentiable)
    return (*vjp(cotangents), None)

  run.defvjp(fwd, bwd)
  return run


def ssd_pallas(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
               initial_states, seq_idx, *, reference: Callable[..., tuple[jax.Array, jax.Array]],
               kernel_backward: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the Pallas SSD kernels of the default device: (y in x's dtype, final states f32).

  Args:
    x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx:
      as :func:`mamba_jax.ops.ssd.ssd`.
    reference: the chunked form with the same full signature, whose VJP is the GPU backward.
    kernel_backward: use the GPU kernels' own backward (True, and None, the default) or
      ``reference``'s VJP (False, a cross-check). Ignored on TPU.
  """
  where = platform()
  if where == "tpu":
    from pallas_kernels.tpu.ssd import ssd_pallas_tpu  # pylint: disable=g-import-not-at-top
    return ssd_pallas_tpu(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                          initial_states, seq_idx, True)
  interpret = where != "gpu"
  if kernel_backward is None or kernel_backward:
    return _gpu_kernels(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                        initial_states, seq_idx, interpret)
  run = _kernel_forward_reference_backward(reference, chunk_size, dt_softplus, dt_limit,
                                           interpret)
  return run(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
