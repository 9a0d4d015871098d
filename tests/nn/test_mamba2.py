"""Mamba2Mixer against a re-derivation from its own parameters (explicit matmuls, the conv op,
``ssd(impl="sequential")``, the gated norm written out); decoding == full forward; packing;
initialisation statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.mamba2 import Mamba2Mixer, Mamba2State, mamba_ssm_order
from mamba_jax.ops.causal_conv1d import causal_conv1d
from mamba_jax.ops.ssd import ssd
from tests.numerics import assert_close

TOLS = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
D_MODEL = 8

# d_inner = 16 everywhere; chunk_size 4 so that length 13 leaves a partial chunk.
CONFIGS = {
    "g1_D_per_head_rmsnorm": dict(d_state=4, headdim=4, chunk_size=4),
    "g2_D_per_channel_gate_bias": dict(d_state=4, d_conv=3, headdim=4, ngroups=2,
                                       D_has_hdim=True, rmsnorm=False, bias=True,
                                       chunk_size=4),
    "g2_dmlp_norm_first_dt_limit": dict(d_state=4, headdim=2, ngroups=2, d_ssm=8,
                                        norm_before_gate=True, dt_limit=(0.01, 0.08),
                                        conv_bias=False, chunk_size=4),
}


def _functional(model):
  """(pure parameter dict, call(params, *args, method="__call__", **kwargs)), for jit/vjp."""
  graphdef, state = nnx.split(model)

  def call(params, *args, method="__call__", **kwargs):
    state_copy = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(state_copy, params)
    return getattr(nnx.merge(graphdef, state_copy), method)(*args, **kwargs)

  return nnx.to_pure_dict(state), call


def _silu(v):
  return v / (1.0 + jnp.exp(-v))


def _mamba_ssm_params(params, cfg):
  """The module's parameters with in_proj / conv put back in mamba_ssm's order
  ([z0, x0, z, x, B, C, dt] columns, [x, B, C] channels) by the inverse permutation."""
  e = 2 * D_MODEL
  e_ssm = cfg.get("d_ssm") or e
  in_idx, conv_idx = mamba_ssm_order(d_mlp=e - e_ssm, d_ssm=e_ssm,
                                     ngroups=cfg.get("ngroups", 1), d_state=cfg["d_state"],
                                     nheads=e_ssm // cfg["headdim"])
  unperm = lambda a, idx: jnp.take(a, jnp.asarray(np.argsort(idx)), axis=-1)
  out = dict(params)
  out["in_proj"] = {k: unperm(v, in_idx) for k, v in params["in_proj"].items()}
  out["conv1d"] = {k: jnp.take(v, jnp.asarray(np.argsort(conv_idx)), axis=0)
                   for k, v in params["conv1d"].items()}
  return out


def _reference(params, u, cfg, seq_idx=None):
  """The mixer re-derived in float64 from the module's parameters, in mamba_ssm's order."""
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  params = _mamba_ssm_params(params, cfg)
  u = f64(u)
  b, l, _ = u.shape
  n, p, g = cfg["d_state"], cfg["headdim"], cfg.get("ngroups", 1)
  e = 2 * D_MODEL
  e_ssm = cfg.get("d_ssm") or e
  h, m = e_ssm // p, e - e_ssm
  zxbcdt = u @ f64(params["in_proj"]["kernel"])
  if "bias" in params["in_proj"]:
    zxbcdt = zxbcdt + f64(params["in_proj"]["bias"])
  z0, x0 = zxbcdt[..., :m], zxbcdt[..., m:2 * m]
  z = zxbcdt[..., 2 * m:2 * m + e_ssm]
  xbc = zxbcdt[..., 2 * m + e_ssm:2 * m + 2 * e_ssm + 2 * g * n]
  dt = zxbcdt[..., 2 * m + 2 * e_ssm + 2 * g * n:]
  conv_bias = f64(params["conv1d"]["bias"]) if "bias" in params["conv1d"] else None
  xbc = causal_conv1d(xbc, f64(params["conv1d"]["kernel"]), conv_bias, activation="silu",
                      seq_idx=seq_idx)
  x, B, C = xbc[..., :e_ssm], xbc[..., e_ssm:e_ssm + g * n], xbc[..., e_ssm + g * n:]
  D = f64(params["D"])
  rmsnorm = cfg.get("rmsnorm", True)
  y = ssd(x.reshape(b, l, h, p), dt, -jnp.exp(f64(params["A_log"])), B.reshape(b, l, g, n),
          C.reshape(b, l, g, n), chunk_size=cfg["chunk_size"],
          D=D.reshape(h, p) if cfg.get("D_has_hdim") else D,
          z=None if rmsnorm else z.reshape(b, l, h, p), dt_bias=f64(params["dt_bias"]),
          dt_softplus=True, dt_limit=cfg.get("dt_limit", (0.0, float("inf"))),
          seq_idx=seq_idx, impl="sequential").reshape(b, l, e_ssm)
  if rmsnorm:
    before = cfg.get("norm_before_gate", False)
    v = y if before else y * _silu(z)
    v = v.reshape(b, l, g, e_ssm // g)
    v = v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + 1e-5)
    y = v.reshape(b, l, e_ssm) * f64(params["norm"]["weight"])
    if before:
      y = y * _silu(z)
  if m:
    y = jnp.concatenate([_silu(z0) * x0, y], axis=-1)
  out = y @ f64(params["out_proj"]["kernel"])
  if "bias" in params["out_proj"]:
    out = out + f64(params["out_proj"]["bias"])
  return out


@functools.lru_cache(maxsize=None)  # construction compiles every init op: build once
def _model(name, dtype=jnp.float64, param_dtype=jnp.float64, seed=0):
  return Mamba2Mixer(D_MODEL, **CONFIGS[name], dtype=dtype, param_dtype=param_dtype,
                     rngs=nnx.Rngs(seed))


def _randomize(params, rng):
  """Biases are zero and D, norm weights one at init; perturb them so the test sees them."""
  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if "bias" in name and "dt_bias" not in name:
      return jnp.asarray(rng.standard_normal(a.shape) * 0.1, a.dtype)
    if "'D'" in name or "weight" in name:
      return jnp.asarray(1 + 0.2 * rng.standard_normal(a.shape), a.dtype)
    return a
  return jax.tree_util.tree_map_with_path(fill, params)


def _packed_ids(batch, length, cut):
  return jnp.asarray(np.broadcast_to((np.arange(length) >= cut).astype(np.int32),
                                     (batch, length)))


@pytest.mark.parametrize("name,dtype,batch,length,packed", [
    ("g1_D_per_head_rmsnorm", jnp.float64, 2, 13, False),
    ("g2_D_per_channel_gate_bias", jnp.float64, 1, 1, False),
    ("g2_dmlp_norm_first_dt_limit", jnp.float64, 2, 13, True),
])
def test_forward_and_gradients_match_reference(name, dtype, batch, length, packed):
  rng = np.random.default_rng(0)
  params, call = _functional(_model(name, dtype, dtype))
  params = _randomize(params, rng)
  u = jnp.asarray(rng.standard_normal((batch, length, D_MODEL)), dtype)
  cot = jnp.asarray(rng.standard_normal((batch, length, D_MODEL)), dtype)
  seq_idx = _packed_ids(batch, length, cut=6) if packed else None

  def fwd_bwd(f, p, u, cot):
    out, vjp = jax.vjp(f, p, u)
    return out, vjp(cot)

  out, grads = jax.jit(functools.partial(
      fwd_bwd, lambda p, u: call(p, u, seq_idx=seq_idx)))(params, u, cot)
  ref, grads_ref = jax.jit(functools.partial(
      fwd_bwd, lambda p, u: _reference(p, u, CONFIGS[name], seq_idx)))(
          params, u, cot.astype(jnp.float64))
  assert out.dtype == dtype and out.shape == (batch, length, D_MODEL)
  assert_close(out, ref, TOLS[dtype], "forward")
  for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(grads_ref)):
    what = f"grad {jax.tree_util.keystr(path)}"
    assert_close(g, g_ref, TOLS[dtype], what)
    # From a zero state a single token never sees the decay exp(Δ·A): A's gradient is 0.
    if length > 1 or "A_log" not in what:
      assert np.any(np.asarray(g) != 0), f"{what} is zero"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_chunk_and_steps_equal_full(name):
  rng = np.random.default_rng(1)
  model = _model(name)
  params, call = _functional(model)
  params = _randomize(params, rng)
  length = 9
  u = jnp.asarray(rng.standard_normal((2, length, D_MODEL)), jnp.float64)
  full, final = jax.jit(lambda p, u: call(p, u, return_state=True))(params, u)
  with_state = jax.jit(lambda p, u, s: call(p, u, initial_state=s, return_state=True))
  step = jax.jit(functools.partial(call, method="step"))
  # Prefill 3 tokens (returned state), continue with a chunk of 3 from it, step the rest.
  y0, state = with_state(params, u[:, :3], model.init_state(2))
  y1, state = with_state(params, u[:, 3:6], state)
  ys = [y0, y1]
  for t in range(6, length):
    y_t, state = step(params, u[:, t], state)
    ys.append(y_t[:, None])
  assert state.ssm_state.dtype == jnp.float64
  assert_close(jnp.concatenate(ys, axis=1), full, TOLS[jnp.float64], "prefill + steps")
  # All tokens stepped from init_state; the states agree with the full pass's.
  state = model.init_state(2)
  ys = []
  for t in range(length):
    y_t, state = step(params, u[:, t], state)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), full, TOLS[jnp.float64], "steps from init")
  assert_close(state.ssm_state, final.ssm_state, TOLS[jnp.float64], "ssm_state")
  assert_close(state.conv_state, final.conv_state, TOLS[jnp.float64], "conv_state")


def test_packed_equals_separate_and_state_continues_last_sequence():
  rng = np.random.default_rng(2)
  params, call = _functional(_model("g2_dmlp_norm_first_dt_limit"))
  forward = jax.jit(call)
  a = jnp.asarray(rng.standard_normal((1, 5, D_MODEL)), jnp.float64)
  b = jnp.asarray(rng.standard_normal((1, 7, D_MODEL)), jnp.float64)
  packed = jnp.concatenate([a, b[:, :6]], axis=1)
  y, state = jax.jit(lambda p, u, s: call(p, u, seq_idx=s, return_state=True))(
      params, packed, _packed_ids(1, 11, cut=5))
  y_b = forward(params, b)
  assert_close(y[:, :5], forward(params, a), TOLS[jnp.float64], "first sequence")
  assert_close(y[:, 5:], y_b[:, :6], TOLS[jnp.float64], "second sequence")
  y_t, _ = jax.jit(functools.partial(call, method="step"))(params, b[:, 6], state)
  assert_close(y_t, y_b[:, 6], TOLS[jnp.float64], "step after a packed prefill")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_close_to_float64_oracle(dtype):
  rng = np.random.default_rng(3)
  name = "g1_D_per_head_rmsnorm"
  params, call = _functional(_model(name, dtype=dtype, param_dtype=jnp.float32))
  u = jnp.asarray(rng.standard_normal((2, 13, D_MODEL)), dtype)
  out = jax.jit(call)(params, u)
  assert out.dtype == dtype
  ref = jax.jit(lambda p, u: _reference(p, u, CONFIGS[name]))(params, u)
  assert_close(out, ref, TOLS[dtype], f"{jnp.dtype(dtype).name} forward")


def test_init_statistics_and_metadata():
  dt_min, dt_max = 0.002, 0.05
  model = Mamba2Mixer(32, d_state=16, headdim=1, ngroups=2, dt_min=dt_min, dt_max=dt_max,
                      rngs=nnx.Rngs(0))  # 64 heads
  h = 64
  assert model.in_proj.kernel.shape == (32, 2 * 64 + 2 * 2 * 16 + h)
  assert model.conv1d.kernel.shape == (64 + 2 * 2 * 16, 4)
  dt = np.asarray(jax.nn.softplus(model.dt_bias[...]))
  assert dt.shape == (h,) and dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
  # log-uniform: log dt spreads over the whole range, centred near the middle.
  np.testing.assert_allclose(np.log(dt).mean(), np.log(dt_min * dt_max) / 2, atol=0.4)
  A = -np.exp(np.asarray(model.A_log[...]))
  assert model.A_log.dtype == jnp.float32 and A.min() >= -16 and A.max() <= -1
  assert A.max() - A.min() > 10  # U(1, 16), not a constant
  assert np.all(np.asarray(model.D[...]) == 1) and model.D.shape == (h,)
  assert np.all(np.asarray(model.norm.weight[...]) == 1)
  assert np.abs(np.asarray(model.in_proj.kernel[...])).max() <= 1 / np.sqrt(32)
  assert np.abs(np.asarray(model.conv1d.kernel[...])).max() <= 0.5  # 1/sqrt(d_conv)
  for p in (model.A_log, model.D, model.dt_bias, model.norm.weight, model.conv1d.bias):
    assert p.get_metadata().get("no_weight_decay") is True
  assert not model.in_proj.kernel.get_metadata().get("no_weight_decay", False)
  # The floor applies when dt_min is below it; conv_init overrides the conv kernel's range.
  floored = Mamba2Mixer(32, d_state=16, headdim=1, ngroups=2, dt_min=1e-5, dt_max=2e-4,
                        dt_init_floor=1e-4, conv_init=0.01, rngs=nnx.Rngs(1))
  assert np.asarray(jax.nn.softplus(floored.dt_bias[...])).min() >= 1e-4 * (1 - 1e-5)
  assert np.abs(np.asarray(floored.conv1d.kernel[...])).max() <= 0.01


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="headdim"):
    Mamba2Mixer(8, headdim=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ngroups"):
    Mamba2Mixer(8, headdim=4, ngroups=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_ssm"):
    Mamba2Mixer(8, headdim=4, d_ssm=20, rngs=nnx.Rngs(0))
  model = _model("g1_D_per_head_rmsnorm")
  with pytest.raises(ValueError, match="u"):
    model(jnp.zeros((1, 3, D_MODEL + 1)))
  bad = Mamba2State(conv_state=jnp.zeros((1, 3, 3)), ssm_state=jnp.zeros((1, 4, 4, 4)))
  with pytest.raises(ValueError, match="conv_state"):
    model.step(jnp.zeros((1, D_MODEL)), bad)


def test_grouped_layout_puts_each_groups_parts_together():
  """mamba_ssm_order: group j's columns are [z_j | x_j | B_j | C_j | dt_j] (z, x, dt those of
  heads j·h/g ..), the conv's channels [x_j | B_j | C_j]; _split / _split_conv read them
  back in head / group order. Here h = 4 heads of p = 2 in g = 2 groups, n = 3, d_mlp = 4."""
  m, s, g, n, h, p = 4, 8, 2, 3, 4, 2
  in_idx, conv_idx = mamba_ssm_order(d_mlp=m, d_ssm=s, ngroups=g, d_state=n, nheads=h)
  width = 2 * m + 2 * s + 2 * g * n + h
  assert sorted(in_idx) == list(range(width)) and sorted(conv_idx) == list(range(s + 2 * g * n))
  z, x, B, C, dt = 2 * m, 2 * m + s, 2 * m + 2 * s, 2 * m + 2 * s + g * n, width - h
  group1 = [*range(z + 4, z + 8), *range(x + 4, x + 8), *range(B + 3, B + 6),
            *range(C + 3, C + 6), dt + 2, dt + 3]
  assert list(in_idx[:2 * m]) == list(range(2 * m))
  assert list(in_idx[2 * m + len(group1):]) == group1
  assert list(conv_idx[len(conv_idx) // 2:]) == [4, 5, 6, 7, 11, 12, 13, 17, 18, 19]
  mixer = Mamba2Mixer(6, d_state=n, expand=2, headdim=p, d_ssm=s, ngroups=g,
                      rngs=nnx.Rngs(0))
  theirs = jnp.arange(width, dtype=jnp.float32)
  z0, x0, z_, xBC, dt_ = mixer._split(theirs[in_idx])
  np.testing.assert_array_equal(z0, theirs[:m])
  np.testing.assert_array_equal(x0, theirs[m:2 * m])
  np.testing.assert_array_equal(z_, theirs[z:z + s])
  np.testing.assert_array_equal(dt_, theirs[dt:])
  np.testing.assert_array_equal(xBC, theirs[x:dt][conv_idx])
  x_, B_, C_ = mixer._split_conv(xBC)
  np.testing.assert_array_equal(x_, theirs[x:x + s].reshape(h, p))
  np.testing.assert_array_equal(B_, theirs[B:B + g * n].reshape(g, n))
  np.testing.assert_array_equal(C_, theirs[C:C + g * n].reshape(g, n))
