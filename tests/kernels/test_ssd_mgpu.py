"""Mosaic GPU (Hopper wgmma) SSD forward against mamba_jax.ops.ssd's sequential oracle.

``ssd_pallas_gpu(..., backend="mosaic")`` runs the forward in the Mosaic GPU kernels
(pallas_kernels/gpu/ssd_mgpu*.py) and the backward in the Triton-lowered kernels; both are
checked here against the float64 oracle: outputs, final states, and the vjp of every input.

The GPU class compiles the kernels (sm_90 only: wgmma). Its interpret twin runs the same
kernels in Mosaic GPU's interpreter on CPU (``plgpu.InterpretGPUParams``) with the smallest
shapes the kernels take (p = n = q = 64); the interpreter needs untiled SMEM, so those runs
allocate the same buffers without the tiling / swizzle transforms, and reads both wgmma
operands from SMEM (the register operand is staged through a buffer). The Triton-lowered
backward runs in the Pallas interpreter there.
"""

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.ops.ssd import ssd
from pallas_kernels.gpu.ssd import ssd_pallas_gpu
from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes
from pallas_kernels.gpu.ssd_mgpu import resolve_backend
from tests.kernels.test_ssd_gpu import GRAD_NAMES, _inputs
from tests.numerics import assert_close

# Norm-relative tolerances: wgmma operands rounded to the input dtype (bf16: 8-bit mantissa,
# f16: 11-bit), float32 accumulation and decays; as the Triton kernels' bf16 bound.
TOLERANCES = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
# Except dA and d dt_bias in bf16: per-head sums over every position of the shared (Triton-
# lowered) backward's bf16-rounded products. Measured on an H100 at SHAPE, seeds 7 and 8:
# dA 1.8-3.4e-2, d dt_bias 0.9-2.6e-2 with this forward; with the Triton-lowered forward on the
# same inputs dA 3.0-8.8e-2, d dt_bias 1.7-6.9e-2 (its residual chunk states are bf16-rounded,
# this forward's nearly float32-exact: final states 3e-6 against 1.6e-3).
SUM_GRAD_TOLERANCES = {jnp.bfloat16: 5e-2, jnp.float16: 5e-3}
SUM_GRADS = ("A", "dt_bias")


def _on_hopper() -> bool:
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


class SSDMosaicCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below."""
  INTERPRET = False
  # (b, l, h, p, g, n, chunk): two chunks and a tail, two groups.
  SHAPE = (2, 700, 8, 64, 2, 64, 256)
  CASES = {
      "full": dict(d_per_channel=True, use_z=True, use_seq=True, use_init=True),
      "plain": dict(d_per_channel=False, use_z=False, use_seq=False, use_init=False),
  }

  def _run(self, dtype, case, seed, shape, grads: bool):
    b, l, h, p, g, n, q = shape
    flags = self.CASES[case]
    primals, seq = _inputs(jax.random.key(seed), dtype, b, l, h, p, g, n, **flags)
    blocks = SSDBlockSizes(block_m=min(64, q), block_k=min(64, q), block_pn=1024)

    def mosaic(x, dt, a, bb, cc, d, z, bias, init):
      return ssd_pallas_gpu(x, dt, a, bb, cc, q, D=d, z=z, dt_bias=bias, dt_softplus=True,
                            initial_states=init, seq_idx=seq, return_final_states=True,
                            blocks=blocks, interpret=self.INTERPRET, backend="mosaic")

    def oracle(x, dt, a, bb, cc, d, z, bias, init):
      return ssd(x, dt, a, bb, cc, q, D=d, z=z, dt_bias=bias, dt_softplus=True,
                 initial_states=init, seq_idx=seq, return_final_states=True,
                 impl="sequential")

    up = lambda v: None if v is None else v.astype(jnp.float64)
    tol = TOLERANCES[dtype]
    name = f"{case} {jnp.dtype(dtype).name} {shape}"
    if not grads:
      y, final = mosaic(*primals)
      y_ref, final_ref = oracle(*map(up, primals))
    else:
      (y, final), vjp = jax.vjp(mosaic, *primals)
      (y_ref, final_ref), vjp_ref = jax.vjp(oracle, *map(up, primals))
    assert y.dtype == dtype and final.dtype == jnp.float32
    assert_close(y, y_ref, tol, f"{name} y")
    assert_close(final, final_ref, tol, f"{name} final state")
    if not grads:
      return
    ky, kf = jax.random.split(jax.random.key(seed + 1))
    dy = jax.random.normal(ky, y.shape, jnp.float32).astype(dtype)
    dfinal = jax.random.normal(kf, final.shape, jnp.float32)
    for gname, gr, ge, prim in zip(GRAD_NAMES, vjp((dy, dfinal)),
                                   vjp_ref((up(dy), up(dfinal))), primals):
      if prim is not None:
        assert gr.dtype == prim.dtype, f"d{gname}: dtype {gr.dtype} != {prim.dtype}"
        bound = SUM_GRAD_TOLERANCES[dtype] if gname in SUM_GRADS else tol
        assert_close(gr, ge, bound, f"{name} d{gname}")

  @pytest.mark.parametrize("case", ["full", "plain"])
  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
  def test_matches_oracle(self, dtype, case):
    self._run(dtype, case, 7, self.SHAPE, grads=True)

  def test_rejects_unsupported(self):
    with pytest.raises(ValueError, match="float32.*backend='triton'"):
      resolve_backend("mosaic", jnp.float32, 64, 128, 256, self.INTERPRET)
    with pytest.raises(ValueError, match="head_dim p=32.*backend='triton'"):
      resolve_backend("mosaic", jnp.bfloat16, 32, 128, 256, self.INTERPRET)
    with pytest.raises(ValueError, match="chunk_size=512.*backend='triton'"):
      resolve_backend("mosaic", jnp.bfloat16, 64, 128, 512, self.INTERPRET)
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
      resolve_backend("cuda", jnp.bfloat16, 64, 128, 256, self.INTERPRET)
    x = jnp.zeros((1, 64, 2, 64), jnp.float32)
    bb = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
      ssd_pallas_gpu(x, jnp.zeros((1, 64, 2)), -jnp.ones((2,)), bb, bb, 64,
                     interpret=self.INTERPRET, backend="mosaic")


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="wgmma needs an sm_90 (Hopper) GPU")
class TestSSDMosaicGPU(SSDMosaicCases):
  """The compiled kernels on a Hopper GPU."""

  @pytest.mark.parametrize("p,n,q", [(64, 128, 256), (128, 128, 128), (64, 256, 256),
                                     (128, 256, 64), (128, 64, 256)])
  def test_shapes(self, p, n, q):
    self._run(jnp.bfloat16, "full", 11, (2, 3 * q + 37, 4, p, 1, n, q), grads=False)

  def test_forward_alone_without_initial_state(self):
    """A forward with no vjp keeps only the final state and reads no initial state."""
    self._run(jnp.bfloat16, "plain", 12, (3, 2 * 256 + 37, 4, 64, 1, 128, 256), grads=False)

  def test_default_backend_is_mosaic(self):
    assert resolve_backend(None, jnp.bfloat16, 64, 128, 256, False) == "mosaic"
    assert resolve_backend(None, jnp.float32, 64, 128, 256, False) == "triton"


class TestSSDMosaicInterpret(SSDMosaicCases):
  """The same kernels in Mosaic GPU's interpreter on CPU: small shapes (p = n = 64), chunks and
  a tail; the vjp (slow: it interprets the Triton-lowered backward too) with two groups."""
  INTERPRET = True
  SHAPE = (1, 150, 2, 64, 2, 64, 64)

  @pytest.mark.parametrize("case", ["full", "plain"])
  @pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bf16"])
  def test_matches_oracle(self, dtype, case):
    """Forward and final states: two row blocks, two heads per CTA, a chunk and a tail (with
    and without an initial state, D, z, seq_idx)."""
    self._run(dtype, case, 3, (1, 200, 2, 64, 1, 64, 128), grads=False)

  @pytest.mark.slow
  def test_vjp(self):
    """The vjp through the combined path (the Triton-lowered backward, interpreted)."""
    self._run(jnp.bfloat16, "full", 3, self.SHAPE, grads=True)

  def test_default_backend_off_hopper(self):
    assert resolve_backend(None, jnp.bfloat16, 64, 128, 256, True) == "triton"
