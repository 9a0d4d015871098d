"""``ssd(impl="pallas")`` dispatch: the interpreted kernels on CPU equal the oracle; ``auto``.

The kernels themselves are tested in depth in tests/kernels/; here only the wiring of the op.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops import ssd_pallas
from mamba_jax.ops.ssd import ssd
from tests.numerics import assert_close


def _inputs(rng, b=1, l=40, h=2, p=16, g=1, n=16, dtype=jnp.float32):
  f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
  return dict(x=f(b, l, h, p), dt=f(b, l, h, scale=0.5), A=-jnp.exp(f(h, scale=0.5)).astype(
      jnp.float32), B=f(b, l, g, n), C=f(b, l, g, n))


def test_pallas_on_cpu_runs_interpreted_kernels_and_matches_oracle():
  rng = np.random.default_rng(0)
  args = _inputs(rng)
  z = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
  kw = dict(chunk_size=16, D=jnp.ones((2,), jnp.float32), z=z,
            dt_bias=jnp.zeros((2,), jnp.float32), dt_softplus=True, return_final_states=True)
  y, h = ssd(**args, **kw, impl="pallas")
  f64 = {k: v.astype(jnp.float64) for k, v in args.items()}
  y_ref, h_ref = ssd(**f64, **{**kw, "z": z.astype(jnp.float64)}, impl="sequential")
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(h, h_ref, 1e-5, "final states")


def test_auto_is_chunked_off_hopper():
  if jax.default_backend() == "gpu":
    pytest.skip("the auto rule differs on GPUs")
  args = _inputs(np.random.default_rng(1), l=20)
  np.testing.assert_array_equal(ssd(**args, chunk_size=16),
                                ssd(**args, chunk_size=16, impl="chunked"))


@pytest.mark.parametrize("change, reason", [
    (dict(dtype=jnp.float64), "x dtype float64"),
    (dict(p=24), "head_dim=24"),
    (dict(n=8), "d_state=8"),
])
def test_supports_names_what_the_kernels_cannot_take(change, reason):
  args = _inputs(np.random.default_rng(2), l=8, **change)
  ok, why = ssd_pallas.supports(args["x"], args["B"], args["C"], None, 16)
  assert not ok and reason in why


def test_supports_chunk_and_mixed_dtypes():
  args = _inputs(np.random.default_rng(3), l=8)
  assert ssd_pallas.supports(args["x"], args["B"], args["C"], None, 64) == (True, "")
  assert "chunk_size=48" in ssd_pallas.supports(args["x"], args["B"], args["C"], None, 48)[1]
  ok, why = ssd_pallas.supports(args["x"], args["B"].astype(jnp.bfloat16), args["C"], None, 16)
  assert not ok and "x's dtype" in why


@pytest.mark.parametrize("kernel_backward", [True, False])
def test_pallas_gradients_match_oracle_with_either_backward(kernel_backward):
  """The kernels' own backward, and the GPU pairing (kernel forward, chunked-form VJP)."""
  from mamba_jax.ops import ssd as ssd_module  # the registry holds the chunked reference
  rng = np.random.default_rng(4)
  args = _inputs(rng, l=24)
  D = jnp.asarray(rng.standard_normal(2), jnp.float32)
  init = jnp.asarray(rng.standard_normal((1, 2, 16, 16)), jnp.float32)
  seq_idx = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)

  def run(x, dt, A, B, C, D, init):
    return ssd_pallas.ssd_pallas(x, dt, A, B, C, 16, D, None, None, True, (0.0, float("inf")),
                                 init, seq_idx, reference=ssd_module._FORMS["chunked"],
                                 kernel_backward=kernel_backward)

  def oracle(x, dt, A, B, C, D, init):
    return ssd(x, dt, A, B, C, chunk_size=16, D=D, dt_softplus=True, initial_states=init,
               seq_idx=seq_idx, return_final_states=True, impl="sequential")

  primals = (args["x"], args["dt"], args["A"], args["B"], args["C"], D, init)
  # float32 matmuls at full precision: on GPUs JAX's default lets XLA use TF32 (the chunked
  # form's VJP then differs from the oracle by ~4e-4 on an H100).
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(run, *primals)
    cot = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in out)
    grads = vjp(cot)
  out_ref, vjp_ref = jax.vjp(oracle, *(p.astype(jnp.float64) for p in primals))
  for name, a, b in zip(("y", "final"), out, out_ref):
    assert_close(a, b, 1e-5, name)
  grads_ref = vjp_ref(tuple(c.astype(jnp.float64) for c in cot))
  for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "init"), grads, grads_ref):
    assert_close(a, b, 1e-5, f"d{name}")


@pytest.mark.parametrize("where, hopper, change, expected", [
    ("gpu", True, {}, "pallas"),
    ("gpu", True, dict(p=24), "chunked"),  # head_dim the kernels do not tile
    ("gpu", True, dict(dtype=jnp.float64), "chunked"),
    ("gpu", True, dict(h=24), "pallas"),  # 24 heads per group (mamba2-130m): 3 blocks of 8
    ("gpu", False, {}, "chunked"),  # pre-Hopper GPU
    ("tpu", False, {}, "chunked"),  # TPU kernels are opt-in until timed on a TPU
    ("cpu", False, {}, "chunked"),
])
def test_auto_rule(monkeypatch, where, hopper, change, expected):
  from mamba_jax.ops import ssd as ssd_module
  monkeypatch.setattr(ssd_module, "platform", lambda: where)
  monkeypatch.setattr(ssd_module, "is_hopper_or_newer", lambda: hopper)
  args = _inputs(np.random.default_rng(5), l=8, **change)
  assert ssd_module._auto_form(args["x"], args["B"], args["C"], None, 16) == expected


@pytest.mark.parametrize("h,g", [(3, 1), (12, 2)], ids=["3_per_group", "6_per_group"])
def test_heads_per_group_not_a_power_of_two_uses_the_kernel_backward(monkeypatch, h, g):
  """3 and 6 heads per group (mamba2-130m has 24): the dB / dC kernels run the group as
  power-of-two blocks of heads and add their partial sums; the reference VJP is not used."""
  from mamba_jax.ops import ssd as ssd_module
  monkeypatch.setattr(ssd_pallas, "_kernel_forward_reference_backward",
                      lambda *a, **k: pytest.fail("the reference VJP ran"))
  rng = np.random.default_rng(7)
  args = _inputs(rng, l=20, h=h, g=g)
  seq_idx = jnp.asarray([[0] * 7 + [1] * 13], jnp.int32)

  def loss(x, dt, B, C):
    y = ssd_pallas.ssd_pallas(x, dt, args["A"], B, C, 16, None, None, None, True,
                              (0.0, float("inf")), None, seq_idx,
                              reference=ssd_module._FORMS["chunked"])[0]
    return jnp.sum(y ** 2)

  def loss_ref(x, dt, B, C):
    return jnp.sum(ssd(x, dt, args["A"], B, C, chunk_size=16, dt_softplus=True,
                       seq_idx=seq_idx, impl="sequential") ** 2)
  names = ("x", "dt", "B", "C")
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs (see above)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*(args[k] for k in names))
  grads_ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(
      *(args[k].astype(jnp.float64) for k in names))
  for name, a, b in zip(names, grads, grads_ref):
    assert_close(a, b, 1e-5, f"d{name}")


def test_resolve_auto_as_picks_the_gpu_backward(monkeypatch):
  # impl="pallas" passes ssd_pallas_gpu the backward resolve_auto_as(ssd_gpu_bwd=...) names,
  # "shared_w" by default.
  from mamba_jax.ops.impl import resolve_auto_as
  from pallas_kernels.gpu import ssd as gpu_ssd
  seen = []
  real = gpu_ssd.ssd_pallas_gpu
  monkeypatch.setattr(gpu_ssd, "ssd_pallas_gpu",
                      lambda *a, **k: seen.append(k["bwd"]) or real(*a, **k))
  args = _inputs(np.random.default_rng(4), l=16)
  loss = lambda x: jnp.sum(ssd(**{**args, "x": x}, chunk_size=16, impl="pallas"))
  grad_shared_w = jax.grad(loss)(args["x"])
  with resolve_auto_as(ssd_gpu_bwd="per_head"):
    grad_per_head = jax.grad(loss)(args["x"])
  assert seen == ["shared_w", "per_head"]
  assert_close(grad_shared_w, grad_per_head, 1e-5, "dx")
  with resolve_auto_as(ssd_gpu_bwd="per_group"), pytest.raises(ValueError, match="per_group"):
    jax.grad(loss)(args["x"])
