"""Tests for the decoding kernels (Pallas, Triton lowering): ``ssd_decode_step`` (Mamba-2's conv
+ SSD step fused), ``selective_state_update`` (the SSM step, plain and reading Mamba-1's rows
in place) and ``causal_conv1d_update`` (plain and from Mamba-1's in_proj pairs).

Each kernel is compared with its op's XLA form (the reference, which the op tests tie to the
full-sequence forward) in the kernel's dtype, and with that reference in float64. The GPU class
runs the compiled kernels on an NVIDIA GPU; the CPU class runs the same cases in the Pallas
interpreter. A separate test lowers every kernel to Triton IR for an H100 without a GPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.causal_conv1d import causal_conv1d_update
from mamba_jax.ops.selective_decode_step import conv_step_from_pairs, ssm_step_from_rows
from mamba_jax.ops.selective_state_update import selective_state_update
from mamba_jax.ops.ssd_decode_step import ssd_decode_step
from pallas_kernels.gpu.ssd_decode_step import default_blocks, in_proj_width
from pallas_kernels.gpu.selective_state_update import default_block_d
from tests.numerics import assert_close

# Norm-relative tolerances against the float64 reference, by the kernel's activation dtype
# (the float32 state and arithmetic are the same; bf16 rounds the conv output and y).
RTOL64 = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _mamba2_args(dtype, b, h, p, n, g, m=0, w=4, D_per_dim=False, bias=True, seed=0):
  """ssd_decode_step's arrays: in_proj's output row (d_mlp m), conv and SSM states, params."""
  rng = np.random.default_rng(seed)
  c = h * p + 2 * g * n
  f32 = jnp.float32
  return dict(
      zxbcdt=_normal(rng, (b, in_proj_width(m, h, p, g, n)), dtype),
      conv_state=_normal(rng, (b, c, w - 1), dtype), conv_weight=_normal(rng, (c, w), f32, 0.5),
      conv_bias=_normal(rng, (c,), f32, 0.3) if bias else None,
      ssm_state=_normal(rng, (b, h, p, n), f32),
      A_log=jnp.asarray(np.log(rng.uniform(0.05, 1.5, h)), f32),
      D=_normal(rng, (h, p) if D_per_dim else (h,), f32), dt_bias=_normal(rng, (h,), f32, 0.5))


def _mamba1_args(dtype, b, e, n, g, z=True, D=True, seed=0):
  rng = np.random.default_rng(seed)
  f32 = jnp.float32
  return dict(
      state=_normal(rng, (b, e, n), f32), x=_normal(rng, (b, e), dtype),
      dt=_normal(rng, (b, e), dtype), A=jnp.asarray(-rng.uniform(0.1, 4.0, (e, n)), f32),
      B=_normal(rng, (b, g, n) if g > 1 else (b, n), dtype),
      C=_normal(rng, (b, g, n) if g > 1 else (b, n), dtype),
      D=_normal(rng, (e,), f32) if D else None, z=_normal(rng, (b, e), dtype) if z else None,
      dt_bias=_normal(rng, (e,), f32, 0.5))


def _to64(args):
  return {k: None if v is None else jnp.asarray(v, jnp.float64) for k, v in args.items()}


def _check(got, ref, ref64, dtype):
  """The kernel's outputs against the XLA form in the same dtypes and the float64 one."""
  for a, r, r64 in zip(got, ref, ref64):
    assert a.shape == r.shape and a.dtype == r.dtype, (a.shape, a.dtype, r.shape, r.dtype)
    assert_close(a, r, rtol=RTOL64[dtype])
    assert_close(a, r64, rtol=RTOL64[dtype])


class DecodeKernelCases:
  """The cases, compiled (GPU) or interpreted (CPU): the op's ``impl`` is IMPL."""

  IMPL = "pallas_interpret"
  MAMBA2 = [  # (b, h, p, n, g, d_mlp, D per dim, gate, conv bias, dt_limit)
      (1, 4, 16, 8, 1, 0, False, False, True, (0.0, float("inf"))),
      (3, 6, 32, 16, 2, 24, True, True, False, (0.01, 0.5)),
  ]
  MAMBA1 = [(1, 64, 8, 1, True, True), (2, 96, 16, 3, False, False)]  # (b, e, n, g, z, D)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("case", range(2))
  def test_ssd_decode_step(self, dtype, case):
    b, h, p, n, g, m, D_per_dim, gate, bias, limit = self.MAMBA2[case]
    args = _mamba2_args(dtype, b, h, p, n, g, m, D_per_dim=D_per_dim, bias=bias, seed=case)
    kw = dict(d_mlp=m, groups=g, gate=gate, dt_softplus=True, dt_limit=limit,
              out_rows=max(b, 2))  # at batch 1 a second, zero row (the mixer's two-row step)
    got = ssd_decode_step(**args, **kw, impl=self.IMPL)
    np.testing.assert_array_equal(np.asarray(got[0][b:], np.float32), 0)
    _check(got, ssd_decode_step(**args, **kw, impl="xla"),
           ssd_decode_step(**_to64(args), **kw, impl="xla"), dtype)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("case", range(2))
  def test_selective_state_update(self, dtype, case):
    b, e, n, g, z, D = self.MAMBA1[case]
    args = _mamba1_args(dtype, b, e, n, g, z=z, D=D, seed=case)
    got = selective_state_update(**args, dt_softplus=True, impl=self.IMPL)
    _check(got, selective_state_update(**args, dt_softplus=True, impl="xla"),
           selective_state_update(**_to64(args), dt_softplus=True, impl="xla"), dtype)

  @pytest.mark.parametrize("dtype, activation, bias, channels", [
      (jnp.float32, "silu", True, 96), (jnp.bfloat16, None, False, 40)])
  def test_causal_conv1d_update(self, dtype, activation, bias, channels):
    rng = np.random.default_rng(3)
    b, w = 2, 4
    args = (_normal(rng, (b, channels), dtype), _normal(rng, (b, channels, w - 1), dtype),
            _normal(rng, (channels, w), jnp.float32, 0.5),
            _normal(rng, (channels,), jnp.float32) if bias else None)
    got = causal_conv1d_update(*args, activation=activation, impl=self.IMPL)
    args64 = [None if a is None else jnp.asarray(a, jnp.float64) for a in args]
    _check(got, causal_conv1d_update(*args, activation=activation, impl="xla"),
           causal_conv1d_update(*args64, activation=activation, impl="xla"), dtype)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("batch, out_rows", [(1, 2), (3, 3)])
  def test_mamba1_steps_from_rows(self, dtype, batch, out_rows):
    """Mamba-1's conv and SSM steps reading in_proj's pairs and x_proj's row in place, the
    output padded to out_rows with zero rows (ops.selective_decode_step)."""
    rng = np.random.default_rng(batch)
    e, n, r, w, f32 = 64, 16, 12, 4, jnp.float32
    rows = out_rows
    pairs = _normal(rng, (batch, e, 2), dtype)
    conv = (_normal(rng, (batch, e, w - 1), dtype), _normal(rng, (e, w), f32, 0.5),
            _normal(rng, (e,), f32, 0.3))
    ssm = dict(state=_normal(rng, (batch, e, n), f32), x=_normal(rng, (rows, e), dtype),
               dt=_normal(rng, (rows, e), dtype), x_dbl=_normal(rng, (rows, r + 2 * n), dtype),
               xz=pairs, A_log=jnp.asarray(np.log(rng.uniform(0.1, 4.0, (e, n))), f32),
               D=_normal(rng, (e,), f32), dt_bias=_normal(rng, (e,), f32, 0.5))
    conv_step = lambda args, impl: conv_step_from_pairs(*args, out_rows=rows, impl=impl)
    ssm_step = lambda args, impl: ssm_step_from_rows(**args, dt_rank=r, out_rows=rows,
                                                     impl=impl)
    for step, args, args64 in ((conv_step, (pairs, *conv), [jnp.asarray(a, jnp.float64)
                                                            for a in (pairs, *conv)]),
                               (ssm_step, ssm, _to64(ssm))):
      got = step(args, self.IMPL)
      _check(got, step(args, "xla"), step(args64, "xla"), dtype)
      assert got[0].shape[0] == rows
      np.testing.assert_array_equal(np.asarray(got[0][batch:], np.float32), 0)

  def test_state_is_updated_over_steps(self):
    """Ten chained steps (the state and conv state fed back) stay on the reference."""
    args = _mamba2_args(jnp.float32, 2, 4, 16, 8, 2, m=8, D_per_dim=True)
    kw = dict(d_mlp=8, groups=2, gate=True, dt_softplus=True)
    states = {impl: (args["conv_state"], args["ssm_state"]) for impl in (self.IMPL, "xla")}
    rng = np.random.default_rng(7)
    for _ in range(10):
      step = dict(args, zxbcdt=_normal(rng, args["zxbcdt"].shape, jnp.float32))
      ys = {}
      for impl, (conv, ssm) in states.items():
        y, conv, ssm = ssd_decode_step(**dict(step, conv_state=conv, ssm_state=ssm), **kw,
                                       impl=impl)
        ys[impl], states[impl] = y, (conv, ssm)
      assert_close(ys[self.IMPL], ys["xla"], rtol=1e-5)
    for a, r in zip(states[self.IMPL], states["xla"]):
      assert_close(a, r, rtol=1e-5)


class TestDecodeKernelsInterpret(DecodeKernelCases):
  """The kernels in the Pallas interpreter on CPU."""


@pytest.mark.gpu
class TestDecodeKernelsGpu(DecodeKernelCases):
  """The compiled kernels on an NVIDIA GPU, with the model sizes' block shapes too."""

  IMPL = "pallas"
  MAMBA2 = DecodeKernelCases.MAMBA2 + [(1, 64, 64, 128, 1, 0, False, False, True,
                                        (0.0, float("inf")))]
  MAMBA1 = DecodeKernelCases.MAMBA1 + [(1, 4096, 16, 1, True, True)]

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("case", range(3))
  def test_ssd_decode_step(self, dtype, case):
    super().test_ssd_decode_step(dtype, case)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("case", range(3))
  def test_selective_state_update(self, dtype, case):
    super().test_selective_state_update(dtype, case)

  @pytest.mark.parametrize("dtype, activation, bias, channels", [
      (jnp.float32, "silu", True, 96), (jnp.bfloat16, None, False, 40),
      (jnp.bfloat16, "silu", True, 4096)])  # 4096: 4 warps, each thread rewriting its taps
  def test_causal_conv1d_update(self, dtype, activation, bias, channels):
    super().test_causal_conv1d_update(dtype, activation, bias, channels)


def test_lowers_to_triton():
  """The decoding kernels lower to Triton IR for an H100 at the 1.3B / 1.4B models' sizes
  (no GPU)."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  S = jax.ShapeDtypeStruct
  h, p, n, w, e = 64, 64, 128, 4, 4096
  c = h * p + 2 * n
  mamba2 = (S((1, in_proj_width(0, h, p, 1, n)), bf16), S((1, c, w - 1), bf16), S((c, w), f32),
            S((c,), f32), S((1, h, p, n), f32), S((h,), f32))
  mamba1 = (S((1, e, 16), f32), S((1, e), bf16), S((1, e), bf16), S((e, 16), f32),
            S((1, 16), bf16), S((1, 16), bf16), S((e,), f32), S((1, e), bf16), S((e,), f32))
  conv = (S((1, e), bf16), S((1, e, w - 1), bf16), S((e, w), f32), S((e,), f32))
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  calls = [
      (lambda *a: ssd_decode_step(*a, d_mlp=0, groups=1, D=jnp.ones((h,)),
                                  dt_bias=jnp.zeros((h,)), dt_softplus=True, impl="pallas"),
       mamba2, ("2", "5")),
      (lambda *a: selective_state_update(*a[:6], D=a[6], z=a[7], dt_bias=a[8],
                                         dt_softplus=True, impl="pallas"), mamba1,
       ("1", "0")),
      (lambda *a: causal_conv1d_update(*a, activation="silu", impl="pallas"), conv, ("1", "1")),
      (lambda xz, *a: conv_step_from_pairs(xz, *a, out_rows=2, impl="pallas"),
       (S((1, e, 2), bf16), *conv[1:]), ("1", "1")),
      (lambda *a: ssm_step_from_rows(*a, dt_rank=128, out_rows=2, impl="pallas"),
       (S((1, e, 16), f32), S((2, e), bf16), S((2, e), bf16), S((2, 160), bf16),
        S((1, e, 2), bf16), S((e, 16), f32), S((e,), f32), S((e,), f32)), ("1", "0")),
  ]
  with jax.sharding.use_abstract_mesh(mesh):
    for fn, shapes, alias in calls:
      text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("xla.gpu.triton") == 1
      # (output, operand): the state updated in place, so that a decoding loop does not copy
      # it. Only the SSM state for the fused Mamba-2 kernel: its programs share B and C's taps
      # of the conv state, which one program rewrites.
      assert re.findall(r"output_operand_alias<output_tuple_indices = \[(\d+)\], "
                        r"operand_index = (\d+)", text) == [alias]


def test_default_blocks():
  assert default_blocks(1, 64, 64) == (32, 4)  # Mamba-2 1.3B at batch 1: 128 programs...
  assert default_blocks(64, 24, 64) == (64, 2)  # ... 130M at batch 64: 1,536
  assert default_block_d(1, 4096, 1) == 16  # Mamba-1 1.4B: 256 programs of 16 channels
  assert default_block_d(64, 4096, 1) == 128


@pytest.mark.parametrize("call, match", [
    (lambda: ssd_decode_step(**_mamba2_args(jnp.float32, 1, 2, 8, 4, 1, w=1), d_mlp=0,
                             groups=1, impl="pallas_interpret"), "conv width >= 2"),
    (lambda: ssd_decode_step(**_mamba2_args(jnp.float32, 1, 2, 6, 4, 1), d_mlp=0, groups=1,
                             impl="pallas_interpret"), "powers of two"),
    (lambda: ssd_decode_step(**_mamba2_args(jnp.float32, 1, 4, 8, 4, 2), d_mlp=0, groups=3,
                             impl="pallas_interpret"), "groups must be a positive int"),
    (lambda: ssd_decode_step(**_mamba2_args(jnp.float32, 1, 4, 8, 4, 2, m=4), d_mlp=0,
                             groups=2, impl="xla"), "zxbcdt"),
    (lambda: selective_state_update(**dict(_mamba1_args(jnp.float32, 1, 32, 8, 1),
                                           A=-jnp.ones((32, 8), jnp.complex64),
                                           state=jnp.zeros((1, 32, 8), jnp.complex64)),
                                    impl="pallas_interpret"), "real A"),
    (lambda: causal_conv1d_update(jnp.zeros((1, 8)), jnp.zeros((1, 8, 5)), jnp.zeros((8, 4)),
                                  impl="pallas"), "length width - 1"),
    (lambda: conv_step_from_pairs(jnp.zeros((2, 8, 2)), jnp.zeros((2, 8, 3)),
                                  jnp.zeros((8, 4)), None, out_rows=1), "out_rows must be"),
    (lambda: ssm_step_from_rows(jnp.zeros((1, 8, 4)), jnp.zeros((2, 8)), jnp.zeros((2, 8)),
                                jnp.zeros((2, 9)), jnp.zeros((1, 8, 2)), jnp.zeros((8, 4)),
                                jnp.zeros(8), jnp.zeros(8), dt_rank=2), "x_dbl must have"),
    (lambda: causal_conv1d_update(jnp.zeros((1, 8)), jnp.zeros((1, 8, 3)), jnp.zeros((8, 4)),
                                  impl="triton"), "impl"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
