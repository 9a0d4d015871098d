"""Pallas GPU kernels of the full-sequence causal conv against ``ops.causal_conv1d``'s XLA form.

The GPU class runs the compiled kernels (Triton lowering) on an NVIDIA GPU; its interpret twin
runs the same kernels in the Pallas interpreter on CPU with small shapes. The oracle is the XLA
form in float64 on the same (upcast) inputs, forward and vjp (x, weight, bias).
"""

import jax
import jax.numpy as jnp
import pytest

from mamba_jax.ops.causal_conv1d import causal_conv1d
from tests.numerics import assert_close

# Norm-relative. float32: one rounding of a w-term sum, measured <= 2e-7 (interpreter). bf16:
# y and dx are rounded to bfloat16 (~2e-3); dweight / dbias, float32 sums, stay near 1e-7.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(key, dtype, b, l, c, w, bias):
  ks = jax.random.split(key, 4)
  x = jax.random.normal(ks[0], (b, l, c), jnp.float32).astype(dtype)
  weight = 0.5 * jax.random.normal(ks[1], (c, w), jnp.float32)
  bb = jax.random.normal(ks[2], (c,), jnp.float32) if bias else None
  dy = jax.random.normal(ks[3], (b, l, c), jnp.float32).astype(dtype)
  return x, weight, bb, dy


class ConvCases:
  """The checks, shared by the compiled (GPU) and interpreted (CPU) classes below."""
  IMPL = "pallas"
  # (b, l, c, w): a Mamba-2 130M conv (1536 + 2·128 channels) at an odd length, batch 1 at a
  # length under one tile, Mamba-1's 1.4B width.
  SHAPES = [(2, 2047, 1792, 4), (1, 37, 256, 4), (1, 1000, 4096, 4)]

  def check(self, dtype, shape, activation, bias):
    b, l, c, w = shape
    x, weight, bb, dy = _inputs(jax.random.key(l + c), dtype, b, l, c, w, bias)
    f64 = lambda a: None if a is None else a.astype(jnp.float64)

    def run(impl, x, weight, bb):
      return causal_conv1d(x, weight, bb, activation=activation, impl=impl)

    y, vjp = jax.vjp(lambda *a: run(self.IMPL, *a), x, weight, bb)
    y_ref, vjp_ref = jax.vjp(lambda *a: run("xla", *map(f64, a)), x, weight, bb)
    tol = TOLERANCES[dtype]
    assert y.dtype == x.dtype
    assert_close(y, y_ref, tol, "y")
    grads, grads_ref = vjp(dy), vjp_ref(dy.astype(jnp.float64))
    for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
      if g_ref is None:
        assert g is None
        continue
      assert g.dtype == g_ref.dtype, name
      assert_close(g, g_ref, tol, f"d{name}")


@pytest.mark.gpu
class TestConvGPU(ConvCases):

  @pytest.mark.parametrize("shape", ConvCases.SHAPES)
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_matches_xla(self, dtype, shape):
    self.check(dtype, shape, "silu", True)

  @pytest.mark.parametrize("width", [2, 3])
  def test_no_activation_no_bias(self, width):
    self.check(jnp.bfloat16, (2, 300, 512, width), None, False)

  def test_auto_picks_the_kernels(self):
    x = jnp.zeros((1, 8, 64), jnp.bfloat16)
    text = jax.jit(lambda x, w: causal_conv1d(x, w, activation="silu")).lower(
        x, jnp.zeros((64, 4), jnp.float32)).as_text()
    assert "causal_conv1d_fwd" in text


class TestConvInterpret(ConvCases):
  """The kernels in the Pallas interpreter on CPU."""
  IMPL = "pallas_interpret"

  @pytest.mark.parametrize("dtype,shape,activation,bias", [
      (jnp.float32, (2, 70, 48, 4), "silu", True),   # length not a multiple of a tile
      (jnp.bfloat16, (1, 5, 32, 4), "silu", False),  # batch 1, shorter than the conv
      (jnp.float32, (1, 300, 16, 3), None, True),    # several backward runs, width 3
  ])
  def test_matches_xla(self, dtype, shape, activation, bias):
    self.check(dtype, shape, activation, bias)


def test_lowers_to_triton():
  """Forward and backward kernels lower to Triton IR for an H100 (no GPU): Mamba-2 130M's
  conv at 16 × 2048 tokens in bfloat16."""
  S = jax.ShapeDtypeStruct

  def fwd_bwd(x, weight, bias):
    y, vjp = jax.vjp(lambda *a: causal_conv1d(*a, activation="silu", impl="pallas"),
                     x, weight, bias)
    return y, vjp(y)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(fwd_bwd).trace(S((16, 2048, 1792), jnp.bfloat16), S((1792, 4), jnp.float32),
                                  S((1792,), jnp.float32)).lower(
                                      lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's choice")
def test_auto_is_xla_on_cpu():
  text = jax.jit(lambda x, w: causal_conv1d(x, w, activation="silu")).lower(
      jnp.zeros((1, 8, 64), jnp.float32), jnp.zeros((64, 4), jnp.float32)).as_text()
  assert "causal_conv1d_fwd" not in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_idx=jnp.zeros((1, 8), jnp.int32)), "neither initial_states, seq_idx"),
    (dict(return_final_states=True), "neither initial_states, seq_idx"),
    (dict(x=jnp.zeros((1, 8, 20), jnp.float32)), "divisible by 16"),
    (dict(x=jnp.zeros((1, 8, 64), jnp.float64)), "float32/bfloat16/float16 x"),
])
def test_pallas_refuses_what_it_does_not_take(kwargs, match):
  args = dict(x=jnp.zeros((1, 8, 64), jnp.float32), weight=jnp.zeros((64, 4), jnp.float32))
  args.update(kwargs)
  x = args.pop("x")
  args["weight"] = args["weight"][:x.shape[2]]
  with pytest.raises(ValueError, match=match):
    causal_conv1d(x, activation="silu", impl="pallas", **args)
