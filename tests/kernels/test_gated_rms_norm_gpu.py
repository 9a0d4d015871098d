"""Pallas GPU gated RMSNorm kernels against mamba_jax.ops.norms.gated_rms_norm (forward and vjp).

The GPU class runs the compiled kernels (Triton lowering) on an NVIDIA GPU at Mamba-2 130M's
width (d = 1536, not a power of two); its interpret twin runs the same checks in the Pallas
interpreter on CPU with small shapes. The reference runs in float64 on the same (upcast)
inputs. A separate test lowers the kernels to Triton IR for an H100 without a GPU.
"""

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.ops.norms import gated_rms_norm
from pallas_kernels.gpu.gated_rms_norm import (backward_grid, block_rows_for, check_supported,
                                               gated_rms_norm_bwd, gated_rms_norm_fwd,
                                               gated_rms_norm_pallas, num_warps_for)
from tests.numerics import assert_close

# Norm-relative tolerances against the float64 reference. The arithmetic is float32 throughout;
# the interpreter measured <= 2.2e-7 in float32, <= 1.9e-3 in bfloat16 and <= 2.4e-4 in float16
# (the rounding of y, dx, dz and a bf16/f16 dweight to the output dtype; the inputs' rounding
# the reference shares).
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
EPS = 1e-5


def _inputs(seed, shape, dtype, weight_dtype, use_z):
  kx, kz, kw, kd = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  z = 2.0 * jax.random.normal(kz, shape, jnp.float32) if use_z else None
  z = None if z is None else z.astype(dtype)
  w = (1.0 + 0.3 * jax.random.normal(kw, shape[-1:], jnp.float32)).astype(weight_dtype)
  dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
  return x, z, w, dy


def _up(v):
  return None if v is None else v.astype(jnp.float64)


class GatedRMSNormCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below."""
  INTERPRET = False
  # name: (shape, groups, norm_before_gate, use_z)
  CASES = {
      "gate_after": ((2, 2048, 1536), 1, False, True),  # Mamba-2's default
      "gate_after_odd_rows": ((1, 37, 1536), 1, False, True),  # batch 1, rows % block != 0
      "gate_before_2groups": ((2, 300, 1536), 2, True, True),
      "no_gate_2groups": ((1, 37, 1536), 2, False, False),
  }
  DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
            (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float16)]
  # (shape, groups) of the row-loop test: 1001 rows in two programs per group of 504 rows, tiles
  # of 4 rows, the last tile of the second program wholly masked.
  ROW_LOOP = ((1, 1001, 1536), 2)

  def _check(self, case, dtype, weight_dtype, seed=0):
    shape, groups, norm_before_gate, use_z = self.CASES[case]
    group_size = shape[-1] // groups
    x, z, w, dy = _inputs(seed, shape, dtype, weight_dtype, use_z)
    pallas = jax.jit(lambda x, z, w: gated_rms_norm_pallas(
        x, z, w, group_size=group_size, norm_before_gate=norm_before_gate, eps=EPS,
        interpret=self.INTERPRET))
    ref = lambda x, z, w: gated_rms_norm(x, z, w, group_size, norm_before_gate, EPS)
    y, vjp = jax.vjp(pallas, x, z, w)
    y_ref, vjp_ref = jax.vjp(ref, _up(x), _up(z), _up(w))
    tol = TOLERANCES[dtype]
    what = f"{case} {jnp.dtype(dtype).name}/{jnp.dtype(weight_dtype).name}"
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, tol, f"{what} y")
    grads = vjp(dy)
    grads_ref = vjp_ref(_up(dy))
    for name, g, g_ref, primal in zip("xzw", grads, grads_ref, (x, z, w)):
      if primal is None:
        assert g is None
        continue
      assert g.shape == primal.shape and g.dtype == primal.dtype, f"d{name}: {g.dtype}"
      assert_close(g, g_ref, tol, f"{what} d{name}")

  @pytest.mark.parametrize("dtype, weight_dtype", DTYPES,
                           ids=["f32", "bf16_wf32", "bf16", "f16"])
  @pytest.mark.parametrize("case", list(CASES))
  def test_matches_reference(self, case, dtype, weight_dtype):
    self._check(case, dtype, weight_dtype)

  def test_backward_row_loop(self):
    """Few programs, so that each walks several row tiles (the last one wholly masked)."""
    shape, groups = self.ROW_LOOP
    d = shape[-1]
    x, z, w, dy = _inputs(1, shape, jnp.float32, jnp.float32, True)
    x, z, dy = x.reshape(-1, d), z.reshape(-1, d), dy.reshape(-1, d)
    kw = dict(group_size=d // groups, norm_before_gate=False, interpret=self.INTERPRET)
    _, rstd = gated_rms_norm_fwd(x, z, w, eps=EPS, **kw)
    rows = x.shape[0]
    tile = block_rows_for(rows, 1 << (d // groups - 1).bit_length())
    per_group, per_program = backward_grid(rows, groups, tile, programs=4)
    assert per_program >= 2 * tile and per_group * per_program - rows >= tile
    dx, dz, dw = gated_rms_norm_bwd(x, z, w, rstd, dy, programs=4, **kw)
    _, vjp_ref = jax.vjp(lambda x, z, w: gated_rms_norm(x, z, w, d // groups, False, EPS),
                         _up(x), _up(z), _up(w))
    for name, g, g_ref in zip("xzw", (dx, dz, dw), vjp_ref(_up(dy))):
      assert_close(g, g_ref, TOLERANCES[jnp.float32], f"row loop d{name}")

  def test_rejects_float64(self):
    x = jnp.zeros((3, 8), jnp.float64)
    w = jnp.ones((8,), jnp.float32)
    assert "float64" in check_supported(x, None, w, 8)
    assert "float64" in check_supported(x.astype(jnp.float32), x, w, 8)
    with pytest.raises(ValueError, match="float32/bfloat16/float16 x, got float64"):
      gated_rms_norm_fwd(x, None, w, group_size=8, norm_before_gate=False, eps=EPS,
                         interpret=self.INTERPRET)


@pytest.mark.gpu
class TestGatedRMSNormPallasGPU(GatedRMSNormCases):
  """The compiled kernels on an NVIDIA GPU: d = 1536 in one and two groups."""


class TestGatedRMSNormPallasGPUInterpret(GatedRMSNormCases):
  """The same kernels in the Pallas interpreter on CPU: d = 96 / 192, groups padded to 128 / 64
  columns, 37 rows in row blocks of 32."""
  INTERPRET = True
  CASES = {
      "gate_after_odd_rows": ((1, 37, 96), 1, False, True),
      "gate_before_2groups": ((2, 40, 192), 2, True, True),
      "no_gate_2groups": ((1, 37, 96), 2, False, False),
  }
  DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16)]
  ROW_LOOP = ((2, 40, 192), 2)  # 80 rows, tiles of 32, two programs of 64 rows per group

  @pytest.mark.parametrize("dtype, weight_dtype", DTYPES, ids=["f32", "bf16"])
  @pytest.mark.parametrize("case", list(CASES))
  def test_matches_reference(self, case, dtype, weight_dtype):
    self._check(case, dtype, weight_dtype)

  def test_float16_mixed_weight(self):
    self._check("gate_after_odd_rows", jnp.float16, jnp.float32)


def test_check_supported():
  x = jnp.zeros((2, 1536), jnp.bfloat16)
  w = jnp.ones((1536,), jnp.float32)
  assert check_supported(x, x, w, 1536) == ""
  assert check_supported(x, None, w, 768) == ""
  assert "rank-0" in check_supported(jnp.zeros((), jnp.float32), None, w, 1)
  assert "float64" in check_supported(x, None, w.astype(jnp.float64), 1536)
  big = jnp.zeros((1, 16384), jnp.float32)
  assert "too large" in check_supported(big, None, jnp.ones((16384,), jnp.float32), 16384)
  assert check_supported(big, None, jnp.ones((16384,), jnp.float32), 8192) == ""


def test_block_choices():
  """Tiles of about 4K elements with 8 warps; two backward programs per H100 SM."""
  assert block_rows_for(4096, 2048) == 2  # 130M (1536 padded to 2048) and 370M
  assert block_rows_for(4096, 4096) == 1  # 1.3B
  assert block_rows_for(1, 2048) == 1  # a decoding step
  assert block_rows_for(37, 128) == 32
  assert num_warps_for(2 * 2048) == 8 and num_warps_for(64) == 1
  assert backward_grid(4096, 1, 2) == (256, 16)  # 256 programs of 8 tiles
  assert backward_grid(4096, 2, 4) == (128, 32)
  assert backward_grid(37, 1, 2) == (19, 2)


def test_lowers_to_triton():
  """The forward and the vjp lower to Triton IR for an H100 at Mamba-2 130M / 370M / 1.3B's
  widths, bf16, 2 x 2048 rows (no GPU)."""
  S = jax.ShapeDtypeStruct
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  configs = [(1536, 1, False, True), (2048, 1, False, True), (4096, 1, False, True),
             (1536, 2, True, True), (2048, 8, False, False)]
  with jax.sharding.use_abstract_mesh(mesh):
    for d, groups, norm_before_gate, use_z in configs:
      x, w = S((2, 2048, d), jnp.bfloat16), S((d,), jnp.float32)

      def fwd(x, z, w, groups=groups, nbg=norm_before_gate, use_z=use_z):
        return gated_rms_norm_pallas(x, z if use_z else None, w, group_size=x.shape[-1] // groups,
                                     norm_before_gate=nbg, eps=EPS)

      vjp = lambda x, z, w, dy, fwd=fwd: jax.vjp(fwd, x, z, w)[1](dy)
      for fn, args, kernels in ((fwd, (x, x, w), 1), (vjp, (x, x, w, x), 2)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == kernels, (d, groups, kernels)
