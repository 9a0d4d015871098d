"""Pallas GPU selective-scan (S6) kernels against mamba_jax.ops.selective_scan's sequential oracle.

The GPU class runs the compiled kernels (Triton lowering) on an NVIDIA GPU; its interpret twin
runs the same kernels in the Pallas interpreter on CPU with tiny shapes. The oracle runs in
float64 on the same (upcast) inputs; forward and ``jax.vjp`` with a random cotangent for every
differentiable input. seq_idx, which the oracle lacks, is checked against running each segment
separately. A separate test lowers forward and backward to Triton IR for an H100 without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import selective_scan
from pallas_kernels.gpu.selective_scan import selective_scan_pallas_gpu
from pallas_kernels.gpu.selective_scan_fwd import ScanGpuBlockSizes
from tests.numerics import assert_close

# Norm-relative tolerances against the float64 oracle. float32: a per-step float32 recurrence,
# measured <= 2.4e-7 (dA, a sum over every position). bfloat16 / float16: inputs rounded, all
# arithmetic float32, only the outputs and gradients rounded to the input dtype; measured
# <= 2e-3 (bf16 ddelta), the same on GPU-interpret and TPU-interpret.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
FULL = dict(groups=2, bc_4d=True, use_d=True, use_z=True, use_bias=True, use_init=True)
PLAIN = dict(groups=1, bc_4d=False, use_d=False, use_z=False, use_bias=False, use_init=False)


def _inputs(key, dtype, b, l, d, n, *, groups, bc_4d, use_d, use_z, use_bias, use_init):
  """Random (u, delta, A, B, C, D, z, delta_bias, initial_state); absent options are None."""
  ks = jax.random.split(key, 9)
  f32 = jnp.float32
  u = jax.random.normal(ks[0], (b, l, d), f32).astype(dtype)
  # Positive, so that Δ > 0 (a decaying recurrence) also without the softplus.
  delta = (0.05 + 0.5 * jnp.abs(jax.random.normal(ks[1], (b, l, d), f32))).astype(dtype)
  A = -jnp.exp(jax.random.normal(ks[2], (d, n), f32))
  bc_shape = (b, l, groups, n) if bc_4d else (b, l, n)
  B = jax.random.normal(ks[3], bc_shape, f32).astype(dtype)
  C = jax.random.normal(ks[4], bc_shape, f32).astype(dtype)
  D = jax.random.normal(ks[5], (d,), f32) if use_d else None
  z = jax.random.normal(ks[6], (b, l, d), f32).astype(dtype) if use_z else None
  bias = 0.5 * jax.random.normal(ks[7], (d,), f32) if use_bias else None
  init = jax.random.normal(ks[8], (b, d, n), f32) if use_init else None
  return u, delta, A, B, C, D, z, bias, init


def _upcast(tree):
  return jax.tree.map(lambda v: v.astype(jnp.float64), tree)


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, v.shape, jnp.float32).astype(v.dtype) for k, v in zip(keys, leaves)])


def _compare_grads(vjp, oracle_vjp, out, primals, dtype, seed, what):
  cotangent = _random_like(out, seed)
  grads = vjp(cotangent)
  expected = oracle_vjp(_upcast(cotangent))
  for name, primal, got, want in zip(GRAD_NAMES, primals, grads, expected):
    if primal is None:
      continue
    assert got.shape == primal.shape and got.dtype == primal.dtype, name
    assert_close(got, want, TOLERANCES[dtype], f"{what} {jnp.dtype(dtype).name} d{name}")


class SelectiveScanKernelCases:
  """The checks, shared by the GPU and TPU kernels, compiled and interpreted.

  Subclasses set ``wrapper`` (the public kernel function; the GPU one here), INTERPRET (the
  wrapper's ``interpret`` argument), SHAPE and BLOCKS.
  """
  wrapper = staticmethod(selective_scan_pallas_gpu)
  INTERPRET = False
  # (b, l, d, n): l = 700 is not a multiple of any block_l.
  SHAPE = (2, 700, 256, 16)
  BLOCKS = None

  def _kernel(self, softplus, final, seq_idx=None):
    def run(u, delta, A, B, C, D, z, bias, init):
      return self.wrapper(u, delta, A, B, C, D, z, bias, softplus, init, seq_idx, final,
                          blocks=self.BLOCKS, interpret=self.INTERPRET)
    return run

  def _compare(self, dtype, flags, seed, *, shape=None, softplus=True, final=True):
    b, l, d, n = shape or self.SHAPE
    primals = _inputs(jax.random.key(seed), dtype, b, l, d, n, **flags)

    def oracle(u, delta, A, B, C, D, z, bias, init):
      return selective_scan(u, delta, A, B, C, D, z, bias, softplus, init, final,
                            impl="sequential")

    out, vjp = jax.vjp(self._kernel(softplus, final), *primals)
    want, oracle_vjp = jax.vjp(jax.jit(oracle), *_upcast(primals))
    outs, wants = jax.tree.leaves(out), jax.tree.leaves(want)
    assert outs[0].dtype == dtype and outs[0].shape == (b, l, d)
    if final:
      assert outs[1].dtype == jnp.float32 and outs[1].shape == (b, d, n)
    for name, got, expected in zip(("y", "final_state"), outs, wants):
      assert_close(got, expected, TOLERANCES[dtype], f"{jnp.dtype(dtype).name} {name}")
    _compare_grads(vjp, oracle_vjp, out, primals, dtype, seed + 1, "vjp")

  def test_full_float32(self):
    """Groups 2, 4-D B/C, D, z, delta_bias + softplus, initial and final states."""
    self._compare(jnp.float32, FULL, 0)

  def test_plain_bfloat16_batch1(self):
    """Batch 1, 3-D B/C, no D / z / bias / softplus / states, length 63."""
    _, _, d, n = self.SHAPE
    self._compare(jnp.bfloat16, PLAIN, 1, shape=(1, 63, d, n), softplus=False, final=False)

  def test_seq_idx_matches_separate_segments(self):
    """Packed rows == each segment scanned alone (forward and gradients).

    Row 0's ids start at 0, so its first segment starts from initial_state; row 1's start at 1
    (virtual seq_idx[−1] = 0), so its initial state is unused and gets a zero gradient.
    """
    _, l, d, n = self.SHAPE
    l = min(l, 40)
    cuts = ((0, 5, 17, l), (0, 1, l - 9, l))  # segment bounds per row (row 1: a 1-long one)
    seq_idx = np.zeros((2, l), np.int32)
    for row, bounds in enumerate(cuts):
      for sid, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_idx[row, s:e] = sid + row
    primals = _inputs(jax.random.key(5), jnp.float32, 2, l, d, n, **FULL)

    def separate(u, delta, A, B, C, D, z, bias, init):
      outs, finals = [], []
      for row, bounds in enumerate(cuts):
        pieces = []
        state = None
        for sid, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
          take = lambda x: None if x is None else x[row:row + 1, s:e]
          h0 = init[row:row + 1] if (sid == 0 and row == 0) else None
          y, state = selective_scan(take(u), take(delta), A, take(B), take(C), D, take(z),
                                    bias, True, h0, True, impl="sequential")
          pieces.append(y)
        outs.append(jnp.concatenate(pieces, axis=1))
        finals.append(state)
      return jnp.concatenate(outs), jnp.concatenate(finals)

    kernel = self._kernel(True, True, seq_idx=jnp.asarray(seq_idx))
    out, vjp = jax.vjp(kernel, *primals)
    want, oracle_vjp = jax.vjp(jax.jit(separate), *_upcast(primals))
    for name, got, expected in zip(("y", "final_state"), out, want):
      assert_close(got, expected, TOLERANCES[jnp.float32], f"seq_idx {name}")
    _compare_grads(vjp, oracle_vjp, out, primals, jnp.float32, 6, "seq_idx")


class TestSelectiveScanGpuInterpret(SelectiveScanKernelCases):
  """The same kernels in the Pallas interpreter on CPU: tiny shapes, 2 chunks of 2 sub-chunks."""
  INTERPRET = True
  SHAPE = (2, 21, 16, 8)
  BLOCKS = ScanGpuBlockSizes(block_d=4, block_l=8, sub_l=4)

  def test_length_one_float16(self):
    """l = 1: one position, padded to a chunk of block_l; forward only."""
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
  def test_full_bfloat16_one_sub_chunk(self):
    """bf16 with block_l == sub_l (no sub-chunk level) and block_d = the whole group."""
    self.BLOCKS = ScanGpuBlockSizes(block_d=8, block_l=4, sub_l=4)
    self._compare(jnp.bfloat16, FULL, 2)


@pytest.mark.gpu
class TestSelectiveScanGpu(SelectiveScanKernelCases):
  """The compiled kernels on an NVIDIA GPU, default block sizes."""


def test_lowers_to_triton():
  """Forward and backward lower to Triton IR for an H100 (no GPU needed to lower)."""
  b, l, d, n = 2, 256, 128, 16
  primals = _inputs(jax.random.key(0), jnp.bfloat16, b, l, d, n, **FULL)
  seq_idx = jnp.zeros((b, l), jnp.int32)

  def loss(*args):
    u, delta, A, B, C, D, z, bias, init = args
    y, final = selective_scan_pallas_gpu(u, delta, A, B, C, D, z, bias, True, init, seq_idx,
                                         True)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*primals).lower(
        lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 2  # the forward and backward kernels


def _small_args(**overrides):
  b, l, d, n = 1, 5, 8, 4
  f32 = jnp.float32
  args = dict(u=jnp.zeros((b, l, d), f32), delta=jnp.zeros((b, l, d), f32),
              A=-jnp.ones((d, n), f32), B=jnp.zeros((b, l, n), f32), C=jnp.zeros((b, l, n), f32))
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides, match", [
    (dict(u=jnp.zeros((1, 5, 8), jnp.float64)), "u must be float32/bfloat16/float16"),
    (dict(delta=jnp.zeros((1, 5, 7), jnp.float32)), "delta must be"),
    (dict(A=-jnp.ones((8, 4), jnp.complex64)), "impl=\"chunked\""),
    (dict(A=-jnp.ones((4, 4), jnp.float32)), "A must be"),
    (dict(B=jnp.zeros((1, 5, 3, 4), jnp.float32)), "B must be"),
    (dict(C=jnp.zeros((1, 5, 2, 4), jnp.float32)), "same number of groups"),
    (dict(D=jnp.ones((4,), jnp.float32)), "D must be"),
    (dict(z=jnp.zeros((1, 5, 8, 1), jnp.float32)), "z must be"),
    (dict(delta_bias=jnp.ones((8, 1), jnp.float32)), "delta_bias must be"),
    (dict(initial_state=jnp.zeros((1, 8, 5), jnp.float32)), "initial_state must be"),
    (dict(seq_idx=jnp.zeros((1, 5), jnp.float32)), "seq_idx must be integer"),
    (dict(A=-jnp.ones((8, 6), jnp.float32), B=jnp.zeros((1, 5, 6), jnp.float32),
          C=jnp.zeros((1, 5, 6), jnp.float32)), "d_state=6 must be a power of two"),
    (dict(blocks=ScanGpuBlockSizes(block_d=16)), "block_d=16 must divide"),
])
def test_bad_arguments_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    selective_scan_pallas_gpu(**_small_args(**overrides), interpret=True)


def test_block_sizes_validate():
  with pytest.raises(ValueError, match="block_d=24 must be a power of two"):
    ScanGpuBlockSizes(block_d=24)
  with pytest.raises(ValueError, match="block_l=48 must be sub_l=16 times a power of two"):
    ScanGpuBlockSizes(block_l=48)
  with pytest.raises(ValueError, match="num_warps=3"):
    ScanGpuBlockSizes(num_warps=3)
