"""The Pallas-kernel form of the selective scan: which kernel runs where.

``impl="pallas"`` of :func:`mamba_jax.ops.selective_scan.selective_scan` lands here with the raw
inputs (the kernels fuse Δ preprocessing, D and the z gate themselves):

  GPU  ``pallas_kernels.gpu.selective_scan.selective_scan_pallas_gpu``: on Hopper the Mosaic GPU
       kernels (``backend="mosaic"``) for the sizes they take (``mosaic_supports``), else
       the Triton-lowered ones (and on other GPUs)
  TPU  ``pallas_kernels.tpu.selective_scan.selective_scan_pallas_tpu`` (Mosaic TPU)
  CPU  the GPU kernels in the Pallas interpreter: slow, for debugging and CI, same numbers

The kernels take float32 / bfloat16 / float16 inputs and a real A; anything else raises their
ValueError, which names ``impl="chunked"`` as the form to use instead.

Shape legend: b batch, l length, e d_inner, n d_state, g groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from absl import logging

from mamba_jax.ops.impl import is_hopper_or_newer, platform

KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(**arrays: jax.Array | None) -> tuple[bool, str]:
  """Whether the kernels take these inputs (named as in ``selective_scan``), and if not, why.

  They take real float32 / bfloat16 / float16 arrays; ``None`` entries (absent options) pass.
  """
  for name, x in arrays.items():
    if x is None:
      continue
    if jnp.iscomplexobj(x):
      return False, f"{name} is complex (the kernels take a real A and real inputs)"
    if jnp.result_type(x) not in KERNEL_DTYPES:
      return False, f"{name} dtype {jnp.result_type(x)} (kernels take float32, bfloat16, float16)"
  return True, ""


def selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                          return_final_state) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Runs the Pallas selective-scan kernels of the default device.

  Returns out (b, l, e) in u's dtype, and with ``return_final_state`` the final state (b, e, n)
  in float32.
  """
  kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                initial_state=initial_state, return_final_state=return_final_state)
  if platform() == "tpu":
    from pallas_kernels.tpu.selective_scan import selective_scan_pallas_tpu  # pylint: disable=g-import-not-at-top
    return selective_scan_pallas_tpu(u, delta, A, B, C, **kwargs)
  from pallas_kernels.gpu.selective_scan import mosaic_supports, selective_scan_pallas_gpu  # pylint: disable=g-import-not-at-top
  on_gpu = platform() == "gpu"
  backend = "triton"
  if on_gpu and is_hopper_or_newer():
    groups = B.shape[2] if B.ndim == 4 else 1
    ok, why = mosaic_supports(u.shape[-1], groups, A.shape[-1], u.dtype)
    if ok:
      backend = "mosaic"
    else:
      logging.info("selective_scan(impl='pallas'): the Triton-lowered kernels: %s", why)
  return selective_scan_pallas_gpu(u, delta, A, B, C, **kwargs, interpret=not on_gpu,
                                   backend=backend)
