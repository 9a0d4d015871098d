"""Pallas TPU selective-scan (S6) kernels against mamba_jax.ops.selective_scan's sequential oracle.

The interpret class runs the Mosaic TPU kernels in the TPU interpreter on CPU
(``interpret=pltpu.InterpretParams()``) with tiny shapes; the ``tpu`` class compiles the same
checks on a TPU at realistic shapes (skipped elsewhere). The checks themselves (forward and
``jax.vjp`` against the float64 oracle, seq_idx against separate segments) are the GPU file's
``SelectiveScanKernelCases``. A separate test lowers both kernels to Mosaic for a v5e target on
CPU, which checks every primitive and block shape against the Mosaic lowering rules without a
TPU.
"""

import jax
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from pallas_kernels.tpu.selective_scan import selective_scan_pallas_tpu
from pallas_kernels.tpu.selective_scan_fwd import MIB, ScanTpuBlockSizes
from tests.kernels.test_selective_scan_gpu import (FULL, PLAIN, TOLERANCES,
                                                   SelectiveScanKernelCases, _inputs, _upcast)
from tests.numerics import assert_close


class TestSelectiveScanTpuInterpret(SelectiveScanKernelCases):
  """Tiny shapes: l = 21 is two chunks of 16 with 11 padding positions; 16 channels in 2 groups
  are padded to 128 lanes per group."""
  wrapper = staticmethod(selective_scan_pallas_tpu)
  INTERPRET = pltpu.InterpretParams()
  SHAPE = (2, 21, 16, 8)
  BLOCKS = ScanTpuBlockSizes(block_l=16, block_d=128)

  # The interpreter costs ~20-45 s per configuration on 2 CPU cores: in CI, the seq_idx test
  # (every option, float32) and the plain bf16 test cover both kernels' code paths; the rest
  # runs with --run-slow.
  @pytest.mark.slow
  def test_full_float32(self):
    super().test_full_float32()

  def test_plain_bfloat16_batch1(self):
    """Batch 1, 3-D B/C, no options, l = 63 in one chunk of 64 (default blocks); races checked."""
    _, _, d, n = self.SHAPE
    self.BLOCKS = None
    self.INTERPRET = pltpu.InterpretParams(detect_races=True)
    self._compare(jnp.bfloat16, PLAIN, 1, shape=(1, 63, d, n), softplus=False, final=False)
    assert interpret_pallas_call.races is not None
    assert not interpret_pallas_call.races.races_found

  @pytest.mark.slow
  def test_length_one_float16(self):
    """l = 1: one position, padded to a chunk of 16; forward only."""
    b, _, d, n = self.SHAPE
    u, delta, A, B, C, D, z, bias, init = _inputs(jax.random.key(3), jnp.float16, b, 1, d, n,
                                                  **FULL)
    y, final = self._kernel(True, True)(u, delta, A, B, C, D, z, bias, init)
    want = selective_scan(*_upcast((u, delta, A, B, C, D, z, bias)), True, _upcast(init), True,
                          impl="sequential")
    assert y.dtype == jnp.float16
    assert_close(y, want[0], TOLERANCES[jnp.float16], "float16 y")
    assert_close(final, want[1], TOLERANCES[jnp.float16], "float16 final_state")

  @pytest.mark.slow
  def test_two_channel_blocks_per_group_bfloat16(self):
    """d = 512 in 2 groups of 256 channels read by two blocks of 128 each, n = 16."""
    self.BLOCKS = ScanTpuBlockSizes(block_l=16, block_d=128)
    self._compare(jnp.bfloat16, FULL, 2, shape=(1, 40, 512, 16))


@pytest.mark.tpu
class TestSelectiveScanTpu(SelectiveScanKernelCases):
  """The compiled kernels on a TPU, default block sizes."""
  wrapper = staticmethod(selective_scan_pallas_tpu)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_mosaic(dtype):
  """Forward and backward lower to Mosaic TPU for a v5e target (no TPU needed to lower)."""
  b, l, d, n = 2, 300, 1024, 16
  primals = _inputs(jax.random.key(0), dtype, b, l, d, n, **FULL)
  seq_idx = jnp.zeros((b, l), jnp.int32)

  def loss(*args):
    u, delta, A, B, C, D, z, bias, init = args
    y, final = selective_scan_pallas_tpu(u, delta, A, B, C, D, z, bias, True, init, seq_idx,
                                         True)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*primals).lower(
        lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 2  # the forward and backward kernels


def _small_args(**overrides):
  b, l, d, n = 1, 5, 8, 4
  f32 = jnp.float32
  args = dict(u=jnp.zeros((b, l, d), f32), delta=jnp.zeros((b, l, d), f32),
              A=-jnp.ones((d, n), f32), B=jnp.zeros((b, l, n), f32), C=jnp.zeros((b, l, n), f32),
              interpret=pltpu.InterpretParams())
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides, match", [
    (dict(u=jnp.zeros((1, 5, 8), jnp.float64)), "u must be float32/bfloat16/float16"),
    (dict(A=-jnp.ones((8, 4), jnp.complex64)), "impl=\"chunked\""),
    (dict(C=jnp.zeros((1, 5, 2, 4), jnp.float32)), "same number of groups"),
    (dict(initial_state=jnp.zeros((1, 4, 8), jnp.float32)), "initial_state must be"),
    (dict(interpret=True), "interpret must be False or a pltpu.InterpretParams"),
    (dict(blocks=ScanTpuBlockSizes(block_d=256)), "block_d=256 must divide"),
    (dict(blocks=ScanTpuBlockSizes(block_l=512, block_d=128, vmem_limit_bytes=4 * MIB)),
     "MiB of VMEM"),
])
def test_bad_arguments_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    selective_scan_pallas_tpu(**_small_args(**overrides))


def test_block_sizes_validate_and_budget_vmem():
  with pytest.raises(ValueError, match="block_l=40 must be a positive multiple of 16"):
    ScanTpuBlockSizes(block_l=40)
  with pytest.raises(ValueError, match="block_d=100 must be a positive multiple of 128"):
    ScanTpuBlockSizes(block_d=100)
  blocks = ScanTpuBlockSizes()  # block_l 128, block_d 512: the default for d_inner >= 512
  assert blocks.vmem_bytes(16, 2, backward=True) < 16 * MIB  # fits v5e's scoped default
  assert blocks.vmem_bytes(16, 2, backward=False) < 2 * MIB
