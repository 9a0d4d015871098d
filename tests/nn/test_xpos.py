"""xPos (Sun et al., 2022): scores depend on n − m only and decay as ζ^((n − m)/scale_base);
RoPE without the scale; attention with positions="xpos" against a float64 oracle that scales
by ζ^(n/s), ζ^(−m/s) directly; KV-cache prefill + steps == full forward; query blocks; no
overflow at position 2^20 in float32."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.nn.attention import Attention
from mamba_jax.nn.rotary import apply_rotary, apply_xpos, xpos_zeta
from tests.nn.test_attention import _functional, _packed_ids, _positions
from tests.numerics import assert_close

D_MODEL = 16


def _pair_scores(q, k, n, m, reference=None, **kw):
  """(h, r/2 + 1): per rotary pair q'_n·k'_m, and the pass-through channels' dot last."""
  c = max(n, m) if reference is None else reference
  qq = apply_xpos(q, jnp.asarray([n]), downscale=False, reference=c, **kw)[0, 0]
  kk = apply_xpos(k, jnp.asarray([m]), downscale=True, reference=c, **kw)[0, 0]
  r = kw["rotary_dim"]
  prod = np.asarray(qq * kk, np.float64)
  pairs = prod[:, :r // 2] + prod[:, r // 2:r]  # non-interleaved pairing (i, i + r/2)
  return np.concatenate([pairs, prod[:, r:].sum(-1, keepdims=True)], axis=-1)


def test_scores_shift_invariant_and_decay_as_zeta():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float64)
  k = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float64)
  kw = dict(rotary_dim=6, scale_base=16.0)
  zeta = np.asarray(xpos_zeta(6, 0.4, jnp.float64))
  np.testing.assert_allclose(zeta, (np.arange(0, 6, 2) / 6 + 0.4) / 1.4)
  base = _pair_scores(q, k, 9, 2, **kw)
  for shift in (1, 40, 5000):
    np.testing.assert_allclose(_pair_scores(q, k, 9 + shift, 2 + shift, **kw), base,
                               rtol=1e-9, atol=1e-300)
  # The reference c changes the factors, not the products.
  np.testing.assert_allclose(_pair_scores(q, k, 9, 2, reference=30, **kw), base, rtol=1e-12)
  # Per pair, xPos = RoPE's pair product times ζ_i^((n − m)/s); pass-through unscaled.
  rope = lambda a, t: np.asarray(apply_rotary(a, jnp.asarray([t]), rotary_dim=6))[0, 0]
  prod = rope(q, 9) * rope(k, 2)
  rope_pairs = prod[:, :3] + prod[:, 3:6]
  np.testing.assert_allclose(base[:, :3], rope_pairs * zeta ** (7 / 16.0), rtol=1e-12)
  np.testing.assert_allclose(base[:, 3], prod[:, 6:].sum(-1), rtol=1e-12)
  assert np.all(zeta < 1) and not np.allclose(base[:, :3], rope_pairs)


@pytest.mark.parametrize("off", [dict(gamma=math.inf), dict(scale_base=math.inf)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_equals_rope_without_scale(off, interleaved):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 1000, (2, 5)), jnp.int32)
  rope = apply_rotary(x, pos, rotary_dim=6, interleaved=interleaved)
  for downscale in (False, True):
    out = apply_xpos(x, pos, rotary_dim=6, interleaved=interleaved, downscale=downscale,
                     reference=jnp.asarray([1000, 3]), **off)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(rope))


def test_float32_finite_at_position_2_pow_20():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32)
  n = 2**20
  near = _pair_scores(q, k, n, n - 5, rotary_dim=8)
  np.testing.assert_allclose(near, _pair_scores(q, k, 5, 0, rotary_dim=8), rtol=2e-3,
                             atol=1e-5)
  # Far keys: the factor underflows to 0 (true weight ζ^(2^20/512) < 1e-1000), never inf/NaN.
  far = _pair_scores(q, k, n, 0, rotary_dim=8)
  assert np.all(np.isfinite(far)) and np.all(far[:, :4] == 0)
  # The paper's unreferenced key factor ζ^(−m/512) would be inf here.
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.float32(xpos_zeta(8)[0]) ** np.float32(-n / 512))


def test_decode_step_at_position_2_pow_20_is_finite():
  model = Attention(D_MODEL, num_heads=2, num_heads_kv=1, head_dim=4, positions="xpos",
                    rngs=nnx.Rngs(0))
  length = 2**20 + 4
  cache = model.init_state(1, length)
  rng = np.random.default_rng(3)
  k = jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32)
  cache = cache.replace(k=k, v=k, index=jnp.asarray(length - 1, jnp.int32))
  y, cache = jax.jit(model.step)(jnp.asarray(rng.standard_normal((1, D_MODEL)), jnp.float32),
                                 cache)
  assert np.all(np.isfinite(np.asarray(y))) and int(cache.index) == length


def _reference(params, x, cfg, seq_idx=None):
  """xPos attention in float64 with the paper's factors ζ^(n/s), ζ^(−m/s) (c = 0)."""
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  x = f64(x)
  batch, length, d = x.shape
  h, hkv = cfg["num_heads"], cfg.get("num_heads_kv") or cfg["num_heads"]
  p = cfg.get("head_dim") or d // h
  r = cfg.get("rotary_emb_dim") or p
  inter = cfg.get("rotary_emb_interleaved", False)
  s_base, gamma = cfg.get("xpos_scale_base", 512.0), cfg.get("xpos_gamma", 0.4)
  pos = _positions(None if seq_idx is None else np.asarray(seq_idx), batch, length)
  qkv = x @ f64(params["in_proj"]["kernel"]) + f64(params["in_proj"]["bias"])
  q = qkv[..., :h * p].reshape(batch, length, h, p)
  k = qkv[..., h * p:(h + hkv) * p].reshape(batch, length, hkv, p)
  v = qkv[..., (h + hkv) * p:].reshape(batch, length, hkv, p)
  zeta = (np.arange(0, r, 2) / r + gamma) / (1 + gamma)
  zeta = np.repeat(zeta, 2) if inter else np.concatenate([zeta, zeta])
  scale = np.concatenate([zeta[None, None] ** (pos[..., None] / s_base),
                          np.ones((batch, length, p - r))], axis=-1)[:, :, None]
  rope = lambda a: apply_rotary(a, jnp.asarray(pos), rotary_dim=r, interleaved=inter)
  q, k = rope(q) * scale, rope(k) / scale
  k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
  scores = jnp.einsum("bihp,bjhp->bhij", q, k) * p ** -0.5
  allowed = np.tril(np.ones((length, length), bool))[None, None]
  if seq_idx is not None:
    s = np.asarray(seq_idx)
    allowed = allowed & (s[:, :, None] == s[:, None, :])[:, None]
  probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  o = jnp.einsum("bhij,bjhp->bihp", probs, v).reshape(batch, length, h * p)
  return o @ f64(params["out_proj"]["kernel"]) + f64(params["out_proj"]["bias"])


# scale_base 4: the decay is strong over a few tokens; span_3 forces query blocks of 3.
CFG = dict(num_heads=4, num_heads_kv=2, head_dim=6, rotary_emb_dim=4, positions="xpos",
           xpos_scale_base=4.0)


@functools.lru_cache(maxsize=None)
def _model(interleaved=False, span=None):
  model = Attention(D_MODEL, **CFG, rotary_emb_interleaved=interleaved, dtype=jnp.float64,
                    param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  if span:
    model.xpos_span = span
  params, call = _functional(model)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (a + 0.1 * rng.standard_normal(a.shape) if "bias" in
                       jax.tree_util.keystr(path) else a), params)
  return model, params, call


@pytest.mark.parametrize("interleaved,span,packed", [(False, None, False), (True, None, True),
                                                     (False, 3, True)])
def test_forward_matches_reference(interleaved, span, packed):
  _, params, call = _model(interleaved, span)
  cfg = {**CFG, "rotary_emb_interleaved": interleaved}
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, D_MODEL)), jnp.float64)
  seq_idx = _packed_ids(2, 9, cut=4) if packed else None
  out = jax.jit(lambda p, x: call(p, x, seq_idx=seq_idx))(params, x)
  assert_close(out, _reference(params, x, cfg, seq_idx), 2e-6, "forward")
  grad = jax.grad(lambda x: jnp.sum(call(params, x, seq_idx=seq_idx) ** 2))(x)
  grad_ref = jax.grad(lambda x: jnp.sum(_reference(params, x, cfg, seq_idx) ** 2))(x)
  assert_close(grad, grad_ref, 2e-6, "grad x")


@pytest.mark.parametrize("span", [None, 2])
def test_cache_prefill_chunk_and_steps_equal_full(span):
  model, params, call = _model(False, span)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, D_MODEL)), jnp.float64)
  full = jax.jit(call)(params, x)
  step = jax.jit(functools.partial(call, method="step"))
  y0, cache = jax.jit(lambda p, x: call(p, x, return_state=True, max_length=11))(
      params, x[:, :3])
  y1, cache = jax.jit(lambda p, x, c: call(p, x, initial_state=c, return_state=True))(
      params, x[:, 3:6], cache)
  ys = [y0, y1]
  for t in range(6, 8):
    y_t, cache = step(params, x[:, t], cache)
    ys.append(y_t[:, None])
  assert_close(jnp.concatenate(ys, axis=1), full, 2e-6, "prefill + chunk + steps")
  # Left-padded prompt through the cache == the unpadded rows.
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  xp = jnp.concatenate([jnp.zeros((2, 2, D_MODEL)), x[:, :3]], axis=1).at[1].set(x[1, :5])
  _, cache = jax.jit(lambda p, x, c: call(p, x, initial_state=c, mask=mask,
                                          return_state=True))(params, xp,
                                                              model.init_state(2, 11))
  y_t, _ = step(params, x[0, 3][None].repeat(2, 0), cache)
  assert_close(y_t[0], full[0, 3], 2e-6, "left-padded prefill + step")


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="causal=True"):
    Attention(D_MODEL, num_heads=2, positions="xpos", causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="xpos_scale_base"):
    Attention(D_MODEL, num_heads=2, positions="xpos", xpos_scale_base=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positions"):
    Attention(D_MODEL, num_heads=2, positions="xPos", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gamma"):
    xpos_zeta(4, gamma=-1.0)
