"""Attention against a plain float64 softmax(Q·Kᵀ·scale + mask)·V written here; RoPE by hand;
KV cache prefill + steps == full forward; packed sequences == separate ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.attention import Attention, KVCache
from mamba_jax.nn.rotary import apply_rotary
from mamba_jax.ops.causal_conv1d import causal_conv1d
from tests.numerics import assert_close

# jax.nn.dot_product_attention (XLA) always takes the softmax in float32, so float64 inputs
# agree with the float64 oracle to float32 precision only.
TOLS = {jnp.float64: 2e-6, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
D_MODEL = 16

CONFIGS = {
    "mha_rope": dict(num_heads=4),
    "gqa_partial_interleaved_rope": dict(num_heads=4, num_heads_kv=2, head_dim=6,
                                         rotary_emb_dim=4, rotary_emb_interleaved=True),
    "mqa_absolute_no_bias": dict(num_heads=4, num_heads_kv=1, positions="absolute",
                                 max_position=32, qkv_proj_bias=False, out_proj_bias=False),
    "none_noncausal": dict(num_heads=2, positions="none", causal=False),
    "conv_mlp_rope": dict(num_heads=4, num_heads_kv=2, d_conv=3, mlp_dim=20,
                          softmax_scale=0.3),
}


def _functional(model):
  """(pure parameter dict, call(params, *args, method="__call__", **kwargs)), for jit/vjp."""
  graphdef, state = nnx.split(model)

  def call(params, *args, method="__call__", **kwargs):
    state_copy = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(state_copy, params)
    return getattr(nnx.merge(graphdef, state_copy), method)(*args, **kwargs)

  return nnx.to_pure_dict(state), call


def _positions(seq_idx, batch, length):
  """Positions restarting at every new id, by an explicit loop."""
  if seq_idx is None:
    return np.broadcast_to(np.arange(length), (batch, length))
  pos = np.zeros((batch, length), np.int64)
  for b in range(batch):
    for t in range(1, length):
      pos[b, t] = 0 if seq_idx[b, t] != seq_idx[b, t - 1] else pos[b, t - 1] + 1
  return pos


def _rope_reference(x, pos, rotary_dim, base, interleaved):
  """Rotation as a complex product: pairs (a, b) -> (a + ib)·exp(i·t·θ_k), θ_k = base^(-2k/r)."""
  half = rotary_dim // 2
  theta = base ** (-2.0 * np.arange(half) / rotary_dim)
  phase = jnp.exp(1j * (pos[..., None] * theta))[:, :, None, :]  # (b, l, 1, r/2)
  if interleaved:
    a, b = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
  else:
    a, b = x[..., :half], x[..., half:rotary_dim]
  rot = (a + 1j * b) * phase
  if interleaved:
    pairs = jnp.stack([rot.real, rot.imag], axis=-1).reshape(*x.shape[:-1], rotary_dim)
  else:
    pairs = jnp.concatenate([rot.real, rot.imag], axis=-1)
  return jnp.concatenate([pairs, x[..., rotary_dim:]], axis=-1)


def _reference(params, x, cfg, seq_idx=None):
  """Attention re-derived in float64 from the module's parameters."""
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  x = f64(x)
  batch, length, d = x.shape
  h = cfg["num_heads"]
  hkv = cfg.get("num_heads_kv") or h
  p = cfg.get("head_dim") or d // h
  positions = cfg.get("positions", "rope")
  pos = _positions(None if seq_idx is None else np.asarray(seq_idx), batch, length)
  if positions == "absolute":
    x = x + f64(params["pos_emb"]["embedding"])[pos]
  qkv = x @ f64(params["in_proj"]["kernel"])
  if "bias" in params["in_proj"]:
    qkv = qkv + f64(params["in_proj"]["bias"])
  qkv_dim = p * (h + 2 * hkv)
  qkv, mlp = qkv[..., :qkv_dim], qkv[..., qkv_dim:]
  if cfg.get("d_conv"):
    qkv = causal_conv1d(qkv, f64(params["conv1d"]["kernel"]), f64(params["conv1d"]["bias"]),
                        seq_idx=seq_idx)
  q = qkv[..., :h * p].reshape(batch, length, h, p)
  k = qkv[..., h * p:(h + hkv) * p].reshape(batch, length, hkv, p)
  v = qkv[..., (h + hkv) * p:].reshape(batch, length, hkv, p)
  if positions == "rope":
    r = cfg.get("rotary_emb_dim") or p
    rope = (r, cfg.get("rotary_emb_base", 10000.0), cfg.get("rotary_emb_interleaved", False))
    q, k = _rope_reference(q, pos, *rope), _rope_reference(k, pos, *rope)
  k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
  scale = cfg.get("softmax_scale") or p ** -0.5
  scores = jnp.einsum("bihp,bjhp->bhij", q, k) * scale
  allowed = np.ones((batch, 1, length, length), bool)
  if cfg.get("causal", True):
    allowed &= np.tril(np.ones((length, length), bool))
  if seq_idx is not None:
    s = np.asarray(seq_idx)
    allowed &= (s[:, :, None] == s[:, None, :])[:, None]
  scores = jnp.where(allowed, scores, -jnp.inf)
  probs = jnp.exp(scores - scores.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  o = jnp.einsum("bhij,bjhp->bihp", probs, v).reshape(batch, length, h * p)
  if mlp.shape[-1]:
    up, gate = mlp[..., :mlp.shape[-1] // 2], mlp[..., mlp.shape[-1] // 2:]
    o = jnp.concatenate([o, up * gate / (1 + jnp.exp(-gate))], axis=-1)
  out = o @ f64(params["out_proj"]["kernel"])
  if "bias" in params["out_proj"]:
    out = out + f64(params["out_proj"]["bias"])
  return out


@functools.lru_cache(maxsize=None)  # construction compiles every init op: build once
def _model(name, dtype=jnp.float64, param_dtype=jnp.float64, seed=0):
  return Attention(D_MODEL, **CONFIGS[name], dtype=dtype, param_dtype=param_dtype,
                   rngs=nnx.Rngs(seed))


def _randomize_biases(params, rng):
  """Biases are zero at init; give them values so that the test sees them."""
  def fill(path, a):
    name = jax.tree_util.keystr(path)
    return jnp.asarray(rng.standard_normal(a.shape) * 0.1, a.dtype) if "bias" in name else a
  return jax.tree_util.tree_map_with_path(fill, params)


def _packed_ids(batch, length, cut):
  return jnp.asarray(np.broadcast_to((np.arange(length) >= cut).astype(np.int32),
                                     (batch, length)))


@pytest.mark.parametrize("name,dtype,batch,length,packed", [
    ("mha_rope", jnp.float64, 2, 7, False),
    ("mha_rope", jnp.float32, 1, 1, False),
    ("gqa_partial_interleaved_rope", jnp.float64, 2, 9, True),
    ("mqa_absolute_no_bias", jnp.float64, 1, 7, True),
    ("none_noncausal", jnp.float64, 2, 9, True),
    ("conv_mlp_rope", jnp.float64, 2, 9, True),
])
def test_forward_and_gradients_match_reference(name, dtype, batch, length, packed):
  rng = np.random.default_rng(0)
  params, call = _functional(_model(name, dtype, dtype))
  params = _randomize_biases(params, rng)
  x = jnp.asarray(rng.standard_normal((batch, length, D_MODEL)), dtype)
  cot = jnp.asarray(rng.standard_normal((batch, length, D_MODEL)), dtype)
  seq_idx = _packed_ids(batch, length, cut=length // 2) if packed else None

  def fwd_bwd(f, p, x, cot):
    out, vjp = jax.vjp(f, p, x)
    return out, vjp(cot)

  out, grads = jax.jit(functools.partial(
      fwd_bwd, lambda p, x: call(p, x, seq_idx=seq_idx)))(params, x, cot)
  ref, grads_ref = jax.jit(functools.partial(
      fwd_bwd, lambda p, x: _reference(p, x, CONFIGS[name], seq_idx)))(
          params, x, cot.astype(jnp.float64))
  assert out.dtype == dtype and out.shape == (batch, length, D_MODEL)
  assert_close(out, ref, TOLS[dtype], "forward")
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, g), g_ref in zip(flat, jax.tree.leaves(grads_ref)):
    what = f"grad {jax.tree_util.keystr(path)}"
    assert_close(g, g_ref, TOLS[dtype], what)
    assert np.any(np.asarray(g) != 0), f"{what} is zero"


def test_rope_hand_computed():
  # One head of 4 channels [1, 2, 3, 4], base 10000: θ = (1, 10000^(-1/2) = 0.01).
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0], jnp.float64).reshape(1, 1, 1, 4)
  rot = lambda t, **kw: np.asarray(apply_rotary(x, jnp.asarray([t]), **kw)).ravel()
  c1, s1, c2, s2 = np.cos(5.0), np.sin(5.0), np.cos(0.05), np.sin(0.05)
  np.testing.assert_allclose(rot(0, rotary_dim=4), [1, 2, 3, 4], rtol=0, atol=1e-15)
  # Non-interleaved, position 5: pairs (x0, x2) at angle 5 and (x1, x3) at angle 0.05.
  np.testing.assert_allclose(
      rot(5, rotary_dim=4),
      [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 1 * s1 + 3 * c1, 2 * s2 + 4 * c2], rtol=1e-14)
  # Interleaved, position 5: pairs (x0, x1) at angle 5 and (x2, x3) at angle 0.05.
  np.testing.assert_allclose(
      rot(5, rotary_dim=4, interleaved=True),
      [1 * c1 - 2 * s1, 1 * s1 + 2 * c1, 3 * c2 - 4 * s2, 3 * s2 + 4 * c2], rtol=1e-14)
  # rotary_dim 2 (θ = 1), position 1: only (x0, x1) turns; x2, x3 pass through.
  c, s = np.cos(1.0), np.sin(1.0)
  np.testing.assert_allclose(rot(1, rotary_dim=2), [c - 2 * s, s + 2 * c, 3, 4], rtol=1e-14)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_offset(interleaved):
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float64)
  k = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float64)
  rope = lambda a, t: apply_rotary(a, jnp.asarray([t]), rotary_dim=6, interleaved=interleaved)
  score = lambda m, n: np.asarray(jnp.sum(rope(q, m) * rope(k, n), axis=-1))
  base = score(7, 3)
  for shift in (1, 40, 1000):
    np.testing.assert_allclose(score(7 + shift, 3 + shift), base, rtol=1e-10)
  assert not np.allclose(score(7, 4), base)


@pytest.mark.parametrize("name", ["mqa_absolute_no_bias", "conv_mlp_rope"])
def test_cache_prefill_chunk_and_steps_equal_full(name):
  rng = np.random.default_rng(4)
  model = _model(name)
  params, call = _functional(model)
  length, max_length = 8, 11
  x = jnp.asarray(rng.standard_normal((2, length, D_MODEL)), jnp.float64)
  full = jax.jit(call)(params, x)
  step = jax.jit(functools.partial(call, method="step"))
  # Prefill 3 tokens, extend by a chunk of 2 through the cache, then step the rest.
  y0, cache = jax.jit(lambda p, x: call(p, x, return_state=True, max_length=max_length))(
      params, x[:, :3])
  y1, cache = jax.jit(lambda p, x, c: call(p, x, initial_state=c, return_state=True))(
      params, x[:, 3:5], cache)
  ys = [y0, y1]
  for t in range(5, length):
    y_t, cache = step(params, x[:, t], cache)
    ys.append(y_t[:, None])
  assert int(cache.index) == length and cache.k.shape == (2, max_length, *cache.k.shape[2:])
  assert_close(jnp.concatenate(ys, axis=1), full, TOLS[jnp.float64], "prefill + steps")
  # All tokens stepped from an empty cache.
  cache = model.init_state(2, max_length)
  ys = []
  for t in range(length):
    y_t, cache = step(params, x[:, t], cache)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), full, TOLS[jnp.float64], "steps from empty")


def test_packed_equals_separate_and_continues_last_sequence():
  rng = np.random.default_rng(5)
  params, call = _functional(_model("conv_mlp_rope"))
  forward = jax.jit(call)
  a = jnp.asarray(rng.standard_normal((1, 3, D_MODEL)), jnp.float64)
  b = jnp.asarray(rng.standard_normal((1, 6, D_MODEL)), jnp.float64)
  packed = jnp.concatenate([a, b[:, :5]], axis=1)
  seq_idx = _packed_ids(1, 8, cut=3)
  y, cache = jax.jit(lambda p, x, s: call(p, x, seq_idx=s, return_state=True, max_length=10))(
      params, packed, seq_idx)
  y_b = forward(params, b)
  assert_close(y[:, :3], forward(params, a), TOLS[jnp.float64], "first sequence")
  assert_close(y[:, 3:], y_b[:, :5], TOLS[jnp.float64], "second sequence")
  # The cache continues the last sequence alone: its start is slot 3.
  assert np.asarray(cache.start).tolist() == [3]
  y_t, _ = jax.jit(functools.partial(call, method="step"))(params, b[:, 5], cache)
  assert_close(y_t, y_b[:, 5], TOLS[jnp.float64], "step after a packed prefill")


def test_bf16_close_to_float64_oracle():
  rng = np.random.default_rng(6)
  name = "gqa_partial_interleaved_rope"
  model = _model(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params, call = _functional(model)
  x = jnp.asarray(rng.standard_normal((2, 9, D_MODEL)), jnp.bfloat16)
  out = jax.jit(call)(params, x)
  assert out.dtype == jnp.bfloat16
  ref = jax.jit(lambda p, x: _reference(p, x, CONFIGS[name]))(params, x)
  assert_close(out, ref, TOLS[jnp.bfloat16], "bf16 forward")


def test_init_statistics_and_weight_decay_metadata():
  model = Attention(64, num_heads=4, positions="absolute", max_position=512, rngs=nnx.Rngs(0))
  kernel = np.asarray(model.in_proj.kernel[...])
  assert kernel.shape == (64, 3 * 64) and np.abs(kernel).max() <= 1 / 8
  emb = np.asarray(model.pos_emb.embedding[...])
  np.testing.assert_allclose(emb.std(), 0.02, rtol=0.05)
  assert np.all(np.asarray(model.in_proj.bias[...]) == 0)
  assert model.out_proj.bias.get_metadata().get("no_weight_decay") is True
  assert model.pos_emb.embedding.get_metadata().get("no_weight_decay") is True
  assert not model.in_proj.kernel.get_metadata().get("no_weight_decay", False)
  cache = model.init_state(3, 20, jnp.bfloat16)
  assert isinstance(cache, KVCache) and cache.k.shape == (3, 20, 4, 16)
  assert cache.k.dtype == jnp.bfloat16 and int(cache.index) == 0


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="rotary_emb_dim"):
    Attention(16, num_heads=2, positions="none", rotary_emb_dim=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads"):
    Attention(16, num_heads=4, num_heads_kv=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positions"):
    Attention(16, num_heads=2, positions="alibi", rngs=nnx.Rngs(0))
  model = _model("mqa_absolute_no_bias")
  x = jnp.zeros((1, 4, D_MODEL), jnp.float64)
  with pytest.raises(ValueError, match="max_length"):
    model(x, return_state=True, max_length=3)
  with pytest.raises(ValueError, match="max_position"):
    model.init_state(1, 33)
  _, cache = model(x, return_state=True, max_length=5)
  with pytest.raises(ValueError, match="no room"):
    model(x[:, :2], initial_state=cache)
  noncausal = _model("none_noncausal")
  with pytest.raises(ValueError, match="causal"):
    noncausal.step(x[:, 0], noncausal.init_state(1, 4))
  with pytest.raises(ValueError, match="x"):
    model(jnp.zeros((1, 4, D_MODEL + 1), jnp.float64))
  with pytest.raises(ValueError, match="nondecreasing"):
    model(x, seq_idx=jnp.asarray([[0, 1, 0, 1]]))
