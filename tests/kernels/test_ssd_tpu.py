"""Pallas TPU SSD kernels against mamba_jax.ops.ssd's sequential oracle (forward and vjp).

The interpret class runs the Mosaic TPU kernels in the TPU interpreter on CPU
(``interpret=pltpu.InterpretParams()``) with tiny shapes; the ``tpu`` class compiles the same
checks on a TPU at realistic shapes (skipped elsewhere). The oracle runs in float64 on the same
(upcast) inputs. A separate test lowers both kernels to Mosaic for a v5e target on CPU, which
checks every primitive and block shape against the Mosaic lowering rules without a TPU.
Interpret mode costs ~5-10 s of compilation per configuration, so each test covers many
options at once.
"""

import jax
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.ssd import ssd
from pallas_kernels.tpu.ssd import ssd_pallas_tpu
from pallas_kernels.tpu.ssd_blocks import MIB, SSDTpuBlockSizes
from tests.numerics import assert_close

# Norm-relative tolerances against the float64 oracle. float32: every matmul at full float32
# precision (the interpreter computes IEEE float32), measured <= 2e-7 (dA). bfloat16: every
# matmul operand rounded to bf16, float32 accumulation, measured <= 2.8e-3 (dB). float16 is
# computed as float32 from fp16-rounded inputs; only y's rounding to fp16 remains.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
FULL = dict(d_per_channel=True, use_z=True, use_seq=True, use_init=True)
PLAIN = dict(d_per_channel=False, use_z=False, use_seq=False, use_init=False)


def _inputs(key, dtype, b, l, h, p, g, n, *, d_per_channel, use_z, use_seq, use_init):
  """Random SSD arguments (x, dt, A, B, C, D, z, dt_bias, initial_states) and seq_idx."""
  ks = jax.random.split(key, 10)
  x = jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(dtype)
  dt = jax.random.normal(ks[1], (b, l, h), jnp.float32) - 1.0
  A = -jnp.exp(0.5 * jax.random.normal(ks[2], (h,), jnp.float32))
  B = jax.random.normal(ks[3], (b, l, g, n), jnp.float32).astype(dtype)
  C = jax.random.normal(ks[4], (b, l, g, n), jnp.float32).astype(dtype)
  D = jax.random.normal(ks[5], (h, p) if d_per_channel else (h,), jnp.float32)
  z = jax.random.normal(ks[6], (b, l, h, p), jnp.float32).astype(dtype) if use_z else None
  dt_bias = 0.5 * jax.random.normal(ks[7], (h,), jnp.float32)
  init = jax.random.normal(ks[8], (b, h, p, n), jnp.float32) if use_init else None
  seq = None
  if use_seq:
    # A new segment at position 3 (inside the first chunk, so initial_states reaches only 3
    # positions of row 0) and about two more at random places. Row 1's ids start at 1, so its
    # initial state is ignored (virtual seq_idx[-1] = 0).
    starts = jax.random.bernoulli(ks[9], 2.0 / l, (b, l)).at[:, :3].set(False).at[:, 3].set(True)
    first_id = jnp.arange(b, dtype=jnp.int32) % 2
    seq = jnp.cumsum(starts.astype(jnp.int32), axis=1) + first_id[:, None]
  return (x, dt, A, B, C, D, z, dt_bias, init), seq


def _upcast(tree):
  return jax.tree.map(lambda v: v.astype(jnp.float64), tree)


class SSDTpuCases:
  """The checks, shared by the interpreted (CPU) and compiled (TPU) classes below."""
  INTERPRET = False
  DETECT_RACES = False
  # (b, l, h, p, g, n, chunk): l not a multiple of the chunk, 3-5 chunks.
  SHAPE = (2, 700, 8, 64, 2, 128, 128)

  def _interpret(self, **kw):
    return pltpu.InterpretParams(**kw) if self.INTERPRET else False

  def _compare(self, dtype, flags, seed, *, return_final_states, shape=None, blocks=None,
               dt_limit=(0.0, float("inf")), interpret=None, check_primal=True,
               also_chunked=False):
    """Kernel vs oracle: forward (the primal path and the vjp's) and every input's cotangent."""
    b, l, h, p, g, n, q = shape or self.SHAPE
    primals, seq = _inputs(jax.random.key(seed), dtype, b, l, h, p, g, n, **flags)
    interpret = self._interpret() if interpret is None else interpret
    kw = dict(dt_softplus=True, dt_limit=dt_limit, seq_idx=seq,
              return_final_states=return_final_states)

    def kernel(x, dt, A, B, C, D, z, dt_bias, init):
      return ssd_pallas_tpu(x, dt, A, B, C, q, D, z, dt_bias, initial_states=init,
                            blocks=blocks, interpret=interpret, **kw)

    def oracle(x, dt, A, B, C, D, z, dt_bias, init, impl="sequential"):
      return ssd(x, dt, A, B, C, q, D, z, dt_bias, initial_states=init, impl=impl, **kw)

    rtol = TOLERANCES[dtype]
    out, vjp = jax.vjp(kernel, *primals)
    want, oracle_vjp = jax.vjp(oracle, *_upcast(primals))
    outs, wants = jax.tree.leaves(out), jax.tree.leaves(want)
    assert outs[0].dtype == dtype and outs[0].shape == (b, l, h, p)
    if return_final_states:
      assert outs[1].dtype == jnp.float32 and outs[1].shape == (b, h, p, n)
    for name, got, expected in zip(("y", "final_states"), outs, wants):
      assert_close(got, expected, rtol, f"{dtype.__name__} vjp forward {name}")
    if check_primal:
      for name, got, expected in zip(("y", "final_states"), jax.tree.leaves(kernel(*primals)),
                                     wants):
        assert_close(got, expected, rtol, f"{dtype.__name__} forward {name}")
    if also_chunked:
      chunked = jax.tree.leaves(oracle(*_upcast(primals), impl="chunked"))
      for name, got, expected in zip(("y", "final_states"), outs, chunked):
        assert_close(got, expected, rtol, f"{dtype.__name__} vs chunked {name}")

    keys = jax.random.split(jax.random.key(seed + 1), 2)
    cotangent = jax.tree.map(
        lambda v, k: jax.random.normal(k, v.shape, jnp.float32).astype(v.dtype), out,
        jax.tree.unflatten(jax.tree.structure(out), list(keys[:len(outs)])))
    grads = vjp(cotangent)
    expected_grads = oracle_vjp(_upcast(cotangent))
    for name, primal, got, expected in zip(GRAD_NAMES, primals, grads, expected_grads):
      if primal is None:
        assert got is None, name
        continue
      assert got.shape == primal.shape and got.dtype == primal.dtype, name
      assert_close(got, expected, rtol, f"{dtype.__name__} d{name}")

  def test_full_float32(self):
    """Groups, seq_idx resets, initial and final states, D per channel, z, dt_bias, dt_limit."""
    self._compare(jnp.float32, FULL, 0, return_final_states=True, dt_limit=(0.0, 0.6),
                  also_chunked=True)

  def test_plain_float32_batch1_two_blocks_per_group(self):
    """Batch 1, one group read by two head blocks, D per head, no z / seq_idx / states."""
    _, l, h, p, _, n, q = self.SHAPE
    blocks = SSDTpuBlockSizes(chunk_size=q, heads_per_block=h // 2)
    interpret = self._interpret(detect_races=True, num_cores_or_threads=2) \
        if self.INTERPRET else False
    self._compare(jnp.float32, PLAIN, 1, return_final_states=False, shape=(1, l, h, p, 1, n, q),
                  blocks=blocks,
                  interpret=interpret, check_primal=False)
    if self.INTERPRET:
      assert interpret_pallas_call.races is not None
      assert not interpret_pallas_call.races.races_found

  def test_full_bfloat16(self):
    self._compare(jnp.bfloat16, FULL, 2, return_final_states=True, check_primal=False)

  def test_float16_forward_shorter_than_chunk(self):
    """fp16, length 5: the chunk shrinks to 16 positions, 11 of them padding."""
    b, _, h, p, g, n, q = self.SHAPE
    (x, dt, A, B, C, D, z, dt_bias, init), seq = _inputs(
        jax.random.key(3), jnp.float16, b, 5, h, p, g, n, **FULL)
    kw = dict(dt_softplus=True, seq_idx=seq, return_final_states=True)
    y, final = ssd_pallas_tpu(x, dt, A, B, C, q, D, z, dt_bias, initial_states=init,
                              interpret=self._interpret(), **kw)
    up = _upcast((x, dt, A, B, C, D, z, dt_bias, init))
    want = ssd(*up[:5], q, *up[5:8], initial_states=up[8], impl="sequential", **kw)
    assert y.dtype == jnp.float16
    assert_close(y, want[0], TOLERANCES[jnp.float16], "float16 y")
    assert_close(final, want[1], TOLERANCES[jnp.float16], "float16 final_states")


class TestSSDTpuInterpret(SSDTpuCases):
  INTERPRET = True
  # Tiny shapes: 3 chunks of 16 (length 40 pads 8), 4 heads, 2 groups, p = n = 16.
  SHAPE = (2, 40, 4, 16, 2, 16, 16)

  @pytest.mark.slow
  def test_model_sized_heads_bfloat16(self):
    """head_dim 64, d_state 128, chunk 64, 4 chunks (length 201), one group of 4 heads."""
    self._compare(jnp.bfloat16, FULL, 4, return_final_states=True,
                  shape=(1, 201, 4, 64, 1, 128, 64), check_primal=False)


@pytest.mark.tpu
class TestSSDTpu(SSDTpuCases):
  INTERPRET = False


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_mosaic(dtype):
  """Forward and backward lower to Mosaic TPU for a v5e target (no TPU needed to lower)."""
  b, l, h, p, g, n, q = 2, 300, 8, 64, 2, 128, 128
  primals, seq = _inputs(jax.random.key(0), dtype, b, l, h, p, g, n, **FULL)

  def loss(*args):
    x, dt, A, B, C, D, z, dt_bias, init = args
    y, final = ssd_pallas_tpu(x, dt, A, B, C, q, D, z, dt_bias, True, (0.0, 1.0), init, seq,
                              True)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(9)))).trace(*primals).lower(
        lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 2  # the forward and backward kernels


def _small_args(**overrides):
  b, l, h, p, g, n = 1, 20, 4, 16, 2, 16
  args = dict(x=jnp.zeros((b, l, h, p), jnp.float32), dt=jnp.zeros((b, l, h), jnp.float32),
              A=-jnp.ones((h,), jnp.float32), B=jnp.zeros((b, l, g, n), jnp.float32),
              C=jnp.zeros((b, l, g, n), jnp.float32), chunk_size=16)
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides, match", [
    (dict(x=jnp.zeros((1, 20, 4, 16), jnp.float64)), "x must be float32"),
    (dict(x=jnp.zeros((20, 4, 16), jnp.float32)), "x must have shape"),
    (dict(dt=jnp.zeros((1, 20, 3), jnp.float32)), "dt must be floating"),
    (dict(B=jnp.zeros((1, 20, 3, 16), jnp.float32)), "B must have shape"),
    (dict(C=jnp.zeros((1, 20, 2, 8), jnp.float32)), "C must have B's shape"),
    (dict(B=jnp.zeros((1, 20, 2, 16), jnp.bfloat16), C=jnp.zeros((1, 20, 2, 16), jnp.bfloat16)),
     "B and C must have x's dtype"),
    (dict(chunk_size=24), "chunk_size must be a positive multiple of 16"),
    (dict(A=-jnp.ones((3,), jnp.float32)), "A must be floating"),
    (dict(D=jnp.ones((4, 8), jnp.float32)), "D must be floating"),
    (dict(z=jnp.zeros((1, 20, 4, 16), jnp.bfloat16)), "z must have x's shape"),
    (dict(dt_bias=jnp.ones((2,), jnp.float32)), "dt_bias must be floating"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit must be"),
    (dict(initial_states=jnp.zeros((1, 4, 16, 8), jnp.float32)), "initial_states must be"),
    (dict(seq_idx=jnp.zeros((1, 20), jnp.float32)), "seq_idx must be integer"),
    (dict(blocks=SSDTpuBlockSizes(chunk_size=16, heads_per_block=4)),
     "heads_per_block=4 must divide heads per group 2"),
    (dict(blocks=SSDTpuBlockSizes(chunk_size=32)), "blocks.chunk_size=32 must equal"),
    (dict(interpret=True), "interpret must be False or a pltpu.InterpretParams"),
])
def test_bad_arguments_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    ssd_pallas_tpu(**_small_args(**overrides))


def test_block_sizes_validate_and_budget_vmem():
  with pytest.raises(ValueError, match="chunk_size=40 must be a positive multiple of 16"):
    SSDTpuBlockSizes(chunk_size=40)
  with pytest.raises(ValueError, match="heads_per_block=0"):
    SSDTpuBlockSizes(heads_per_block=0)
  blocks = SSDTpuBlockSizes(chunk_size=256, heads_per_block=8)
  # The Mamba-2 shape (p 64, n 128, bf16) fits v5e's 16 MiB default; the largest f32 one 32 MiB.
  assert blocks.vmem_bytes(64, 128, jnp.bfloat16, backward=True) < 16 * MIB
  assert blocks.vmem_bytes(128, 256, jnp.float32, backward=True) < 32 * MIB
  blocks.check(heads=32, groups=1, head_dim=128, d_state=256, dtype=jnp.float32)
  small = SSDTpuBlockSizes(chunk_size=256, heads_per_block=8, vmem_limit_bytes=16 * MIB)
  with pytest.raises(ValueError, match="need .* MiB of VMEM"):
    small.check(heads=32, groups=1, head_dim=128, d_state=256, dtype=jnp.float32)
  assert np.isfinite(blocks.vmem_bytes(64, 16, jnp.float16, backward=False))
