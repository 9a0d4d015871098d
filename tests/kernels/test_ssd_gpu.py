"""Pallas GPU SSD kernels against mamba_jax.ops.ssd's sequential oracle (forward and vjp).

The GPU class runs the compiled kernels (Triton lowering) on an NVIDIA GPU; its interpret twin
runs the same kernels in the Pallas interpreter on CPU with tiny shapes. The oracle runs in
float64 on the same (upcast) inputs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import ssd
from pallas_kernels.gpu.ssd import ssd_pallas_gpu
from pallas_kernels.gpu.ssd_blocks import SSDBlockSizes
from tests.numerics import assert_close, relative_error

# Norm-relative tolerances. float32: IEEE float32 matmuls (no TF32), measured <= 3e-6 (dA, a
# sum over every position). bfloat16: operands of every matmul are rounded to bf16 (as in
# mamba_ssm), measured <= 1.2e-2 (dt_bias, a sum over positions of bf16-rounded products).
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# dA and ddt_bias are per-head sums over every (batch, position, channel) of terms that cancel,
# so the per-element error of ddt is amplified in them. float32: on the H100 dA reached 1.4e-5
# (the interpreter, summing in another order, 3e-6). bfloat16: the kernels feed the tensor cores
# bf16-rounded intermediates (as mamba_ssm's Triton kernels do), so ddt carries ~2e-3 and the
# sums 1e-2 to 9e-2 (H100 and interpreter alike); the chunked XLA form, which computes in
# float32, gets ~1e-7. ``ssd_pallas(kernel_backward=False)`` gives the chunked form's gradients.
REDUCTION_GRADS = ("A", "dt_bias")
REDUCTION_TOLERANCES = {jnp.float32: 5e-5, jnp.bfloat16: 1e-1}
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _inputs(key, dtype, b, l, h, p, g, n, *, d_per_channel, use_z, use_seq, use_init,
            decay_scale=1.0):
  ks = jax.random.split(key, 10)
  x = jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(dtype)
  dt = jax.random.normal(ks[1], (b, l, h), jnp.float32) - 1.0
  a = -decay_scale * jnp.exp(0.5 * jax.random.normal(ks[2], (h,), jnp.float32))
  bb = jax.random.normal(ks[3], (b, l, g, n), jnp.float32).astype(dtype)
  cc = jax.random.normal(ks[4], (b, l, g, n), jnp.float32).astype(dtype)
  d = jax.random.normal(ks[5], (h, p) if d_per_channel else (h,), jnp.float32)
  z = jax.random.normal(ks[6], (b, l, h, p), jnp.float32).astype(dtype) if use_z else None
  bias = 0.5 * jax.random.normal(ks[7], (h,), jnp.float32)
  init = jax.random.normal(ks[8], (b, h, p, n), jnp.float32) if use_init else None
  seq = None
  if use_seq:
    # Nondecreasing ids starting at 0, a few boundaries (one inside the first chunk).
    starts = jax.random.bernoulli(ks[9], 4.0 / l, (b, l)).at[:, 3].set(True)
    seq = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
    seq = seq.at[:, :3].set(0)
  return (x, dt, a, bb, cc, d, z, bias, init), seq


class SSDCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below."""
  INTERPRET = False
  BWD = "per_head"  # the backward's dB / dC kernels (ssd_pallas_gpu's ``bwd``)
  TOLERANCE_SCALE: dict[str, float] = {}  # per case, times TOLERANCES / REDUCTION_TOLERANCES
  # (b, l, h, p, g, n, chunk, block_m, block_k, block_pn)
  SHAPE = (2, 700, 8, 64, 2, 64, 256, 64, 64, 1024)
  CASES = {
      "full": dict(d_per_channel=True, use_z=True, use_seq=True, use_init=True),
      "plain": dict(d_per_channel=False, use_z=False, use_seq=False, use_init=False),
  }

  def _check(self, dtype, case, seed):
    b, l, h, p, g, n, q, bm, bk, bpn = self.SHAPE
    flags = self.CASES[case]
    primals, seq = _inputs(jax.random.key(seed), dtype, b, l, h, p, g, n, **flags)
    blocks = SSDBlockSizes(block_m=bm, block_k=bk, block_pn=bpn)

    def pallas(x, dt, a, bb, cc, d, z, bias, init):
      return ssd_pallas_gpu(x, dt, a, bb, cc, q, D=d, z=z, dt_bias=bias, dt_softplus=True,
                            initial_states=init, seq_idx=seq, return_final_states=True,
                            blocks=blocks, interpret=self.INTERPRET, bwd=self.BWD)

    def oracle(x, dt, a, bb, cc, d, z, bias, init):
      return ssd(x, dt, a, bb, cc, q, D=d, z=z, dt_bias=bias, dt_softplus=True,
                 initial_states=init, seq_idx=seq, return_final_states=True,
                 impl="sequential")

    up = lambda v: None if v is None else v.astype(jnp.float64)
    (y, final), vjp = jax.vjp(pallas, *primals)
    (y_ref, final_ref), vjp_ref = jax.vjp(oracle, *map(up, primals))
    tol = TOLERANCES[dtype] * self.TOLERANCE_SCALE.get(case, 1.0)
    assert y.dtype == dtype and final.dtype == jnp.float32
    assert_close(y, y_ref, tol, f"{case} {dtype.__name__} y")
    assert_close(final, final_ref, tol, f"{case} {dtype.__name__} final state")

    ky, kf = jax.random.split(jax.random.key(seed + 1))
    dy = jax.random.normal(ky, y.shape, jnp.float32).astype(dtype)
    dfinal = jax.random.normal(kf, final.shape, jnp.float32)
    grads = vjp((dy, dfinal))
    grads_ref = vjp_ref((up(dy), up(dfinal)))
    errors = {}
    for name, gr, ge, prim in zip(GRAD_NAMES, grads, grads_ref, primals):
      if prim is None:
        continue
      assert gr.dtype == prim.dtype, f"d{name}: dtype {gr.dtype} != {prim.dtype}"
      errors[name] = relative_error(gr, ge)
      gtol = (REDUCTION_TOLERANCES[dtype] * self.TOLERANCE_SCALE.get(case, 1.0)
              if name in REDUCTION_GRADS else tol)
      assert_close(gr, ge, gtol, f"{case} {dtype.__name__} d{name}")
    return errors

  @pytest.mark.parametrize("case", ["full", "plain"])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_matches_oracle(self, dtype, case):
    self._check(dtype, case, seed=7)

  def test_rejects_bad_shapes(self):
    x = jnp.zeros((1, 32, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="bwd"):
      ssd_pallas_gpu(x, x[..., 0], -jnp.ones((2,)), x[:, :, :1], x[:, :, :1], 16,
                     interpret=self.INTERPRET, bwd="per_group")
    dt = jnp.zeros((1, 32, 2), jnp.float32)
    a = -jnp.ones((2,), jnp.float32)
    bb = jnp.zeros((1, 32, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="dt must have shape"):
      ssd_pallas_gpu(x, dt[:, :, :1], a, bb, bb, 16, interpret=self.INTERPRET)
    with pytest.raises(ValueError, match="must have x's dtype"):
      ssd_pallas_gpu(x, dt, a, bb.astype(jnp.bfloat16), bb, 16, interpret=self.INTERPRET)
    with pytest.raises(ValueError, match="chunk_size=24 must be a power of two"):
      ssd_pallas_gpu(x, dt, a, bb, bb, 24, interpret=self.INTERPRET)
    with pytest.raises(ValueError, match="block_m=48 must be a power of two"):
      SSDBlockSizes(block_m=48)


@pytest.mark.gpu
class TestSSDPallasGPU(SSDCases):
  """The compiled kernels on an NVIDIA GPU: l = 700 (two chunks of 256 + a tail)."""


@pytest.mark.gpu
class TestSSDPallasGPU24HeadsPerGroup(SSDCases):
  """mamba2-130m's layout, 24 heads in one group: the dB / dC backward runs 3 blocks of 8."""
  SHAPE = (1, 700, 24, 64, 1, 128, 256, 64, 64, 1024)

  @pytest.mark.parametrize("case", ["full"])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_matches_oracle(self, dtype, case):
    self._check(dtype, case, seed=11)


@pytest.mark.gpu
class TestSSDPallasGPUSharedW(TestSSDPallasGPU):
  """``bwd="shared_w"`` compiled: dB / dC through the head-summed W."""
  BWD = "shared_w"


@pytest.mark.gpu
class TestSSDPallasGPU24HeadsPerGroupSharedW(TestSSDPallasGPU24HeadsPerGroup):
  """``bwd="shared_w"`` with 24 heads per group: W, dB and dC summed over 3 head blocks."""
  BWD = "shared_w"


class TestSSDPallasGPUInterpret(SSDCases):
  """The same kernels in the Pallas interpreter on CPU: tiny shapes, two chunks + a tail."""
  INTERPRET = True
  SHAPE = (1, 40, 2, 16, 1, 16, 16, 16, 16, 128)

  @pytest.mark.parametrize("case", ["full"])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_matches_oracle(self, dtype, case):
    self._check(dtype, case, seed=3)


class TestSSDPallasGPUInterpretTiles(SSDCases):
  """The interpreter with two row / inner blocks per chunk (the backward's skipped tiles) and 6
  heads per group (the dB / dC kernels' head blocks: 3 blocks of 2, summed after)."""
  INTERPRET = True
  SHAPE = (1, 72, 12, 16, 2, 16, 32, 16, 16, 128)

  @pytest.mark.parametrize("case", ["full", "plain"])
  @pytest.mark.parametrize("dtype", [jnp.float32], ids=["f32"])
  def test_matches_oracle(self, dtype, case):
    self._check(dtype, case, seed=5)


class TestSSDPallasGPUInterpretTilesSharedW(TestSSDPallasGPUInterpretTiles):
  """The same with ``bwd="shared_w"``: W's zeroed tiles and the summed head blocks."""
  BWD = "shared_w"


class TestSSDPallasGPUInterpretSharedWTileShapes(SSDCases):
  """``bwd="shared_w"`` in the interpreter with inner tiles wider than the row blocks (a tile
  that meets the diagonal holds rows after it too) and narrower (two tiles meet it), bfloat16,
  and decays strong enough (|A| x 20) that most of W underflows: the factored tiles must give
  zeros there, not overflow. Strong decays make the decay gradient's terms cancel more: on
  (2, 300, 4 heads, 32, N 32) the per-head backward's ddt / dA errors reach 2.2e-5 / 2.0e-4
  (float32) and 2.0e-2 / 0.23 (bfloat16), this one's 5.1e-6 / 4.3e-5 and 2.0e-2 / 0.23, so that
  case gets 5x the tolerances."""
  INTERPRET = True
  BWD = "shared_w"
  TOLERANCE_SCALE = {"strong_decay": 5.0}
  CASES = dict(SSDCases.CASES,
               strong_decay=dict(d_per_channel=True, use_z=False, use_seq=True, use_init=True,
                                 decay_scale=20.0))

  @pytest.mark.parametrize("dtype,case,blocks", [
      (jnp.float32, "full", (16, 32)), (jnp.float32, "plain", (32, 16)),
      (jnp.float32, "strong_decay", (16, 32)), (jnp.float32, "strong_decay", (32, 16)),
      (jnp.bfloat16, "plain", (16, 32)), (jnp.bfloat16, "strong_decay", (32, 16))],
      ids=["f32-full-bk_wider", "f32-plain-bk_narrower", "f32-strong_decay-bk_wider",
           "f32-strong_decay-bk_narrower", "bf16-plain-bk_wider", "bf16-strong_decay-bk_narrower"])
  def test_matches_oracle(self, dtype, case, blocks):
    bm, bk = blocks
    self.SHAPE = (1, 150, 4, 16, 1, 16, 64, bm, bk, 128)
    self._check(dtype, case, seed=13)


@pytest.mark.parametrize("bwd", ["per_head", "shared_w"])
def test_backward_lowers_to_triton(bwd):
  """Forward and backward lower to Triton IR for an H100 (no GPU needed): Mamba-2 130M's
  layout (24 heads of 64 in one group, N = 128) at 2 x 512 tokens in bfloat16."""
  S = jax.ShapeDtypeStruct
  b, l, h, p, n = 2, 512, 24, 64, 128

  def fwd_bwd(x, dt, a, bb, cc):
    y, vjp = jax.vjp(lambda *args: ssd_pallas_gpu(*args, 256, backend="triton", bwd=bwd),
                     x, dt, a, bb, cc)
    return y, vjp(y)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(fwd_bwd).trace(
        S((b, l, h, p), jnp.bfloat16), S((b, l, h), jnp.float32), S((h,), jnp.float32),
        S((b, l, 1, n), jnp.bfloat16), S((b, l, 1, n), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
  names = ("ssd_bwd_w", "ssd_bwd_dc_from_w") if bwd == "shared_w" else ("ssd_bwd_db",
                                                                       "ssd_bwd_dc")
  assert "ssd_bwd_dx" in text and all(name in text for name in names)
  assert text.count("xla.gpu.triton") >= 8
