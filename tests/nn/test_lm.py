"""Tests of MambaLM and Block: the forward against a re-derivation from the layers, prefill +
steps against the full forward, packed sequences, tied weights, initialisation scales,
gradients, bf16, and the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.nn.lm import MambaLM, weight_decay_mask
from tests.numerics import assert_close

TOL = {jnp.float64: 1e-10, jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
# Models with attention layers in float64: the attention softmax is taken in float32.
TOL_ATTENTION_FLOAT64 = 1e-7


def make(layer: str, dtype=jnp.float32, seed=0, **config_changes) -> MambaLM:
  config = MambaConfig.tiny(layer).replace(**config_changes)
  return MambaLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def tokens(config: MambaConfig, shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape),
                     jnp.int32)


def rms(x, w, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def lm_reference(model: MambaLM, ids):
  """x_{i+1} = x_i + mixer_i(RMSNorm_i(x_i)); logits = RMSNorm_f(x_L) · Eᵀ, in float64.

  The mixers are called directly (they are tested against their own re-derivations); the
  residual stream, norms and head are recomputed here in numpy.
  """
  bb = model.backbone
  emb = np.asarray(bb.embedding.embedding[...], np.float64)
  x = emb[np.asarray(ids)]
  for layer in bb.layers:
    h = rms(x, np.asarray(layer.norm.weight[...], np.float64))
    x = x + np.asarray(layer.mixer(jnp.asarray(h, model.dtype)), np.float64)
    if layer.mlp is not None:
      h = rms(x, np.asarray(layer.norm2.weight[...], np.float64))
      x = x + np.asarray(layer.mlp(jnp.asarray(h, model.dtype)), np.float64)
  h = rms(x, np.asarray(bb.norm_f.weight[...], np.float64))
  head = emb.T if model.lm_head is None else np.asarray(model.lm_head.kernel[...], np.float64)
  return h @ head


# Every test below runs the models eagerly on ids of one shape (and its prefixes), so the
# compiled primitives are shared between tests: keep BATCH, LENGTH and PREFIX as they are.
# The hybrid model (Mamba-2, attention, Mamba-2, each with a gated MLP) runs in CI; the
# Mamba-1 model (its mixer is tested in test_mamba1.py) with --run-slow.
BATCH, LENGTH, PREFIX = 2, 7, 4


@pytest.fixture(scope="module", params=["hybrid", pytest.param("Mamba1", marks=pytest.mark.slow)])
def model64(request) -> MambaLM:
  return make(request.param, jnp.float64, seed=1)


def tolerance(model: MambaLM) -> float:
  return TOL_ATTENTION_FLOAT64 if model.config.attn_layer_idx else TOL[jnp.float64]


def test_forward_matches_layerwise_reference(model64):
  ids = tokens(model64.config, (BATCH, LENGTH))
  logits = model64(ids)
  assert logits.shape == (BATCH, LENGTH, 64) and logits.dtype == jnp.float64
  assert_close(logits, lm_reference(model64, ids), tolerance(model64), "logits")


def test_prefill_then_steps_equal_full_forward(model64):
  ids = tokens(model64.config, (BATCH, LENGTH))
  full = model64(ids)
  logits, state = model64(ids[:, :PREFIX], return_state=True, max_length=LENGTH)
  steps = [logits]
  for t in range(PREFIX, LENGTH):
    logits_t, state = model64.step(ids[:, t], state)
    steps.append(logits_t[:, None])
  assert_close(jnp.concatenate(steps, axis=1), full, tolerance(model64), "prefill + steps")
  logits_0, _ = model64.step(ids[:, 0], model64.init_state(BATCH, LENGTH, jnp.float64))
  assert_close(logits_0, full[:, 0], tolerance(model64), "first step from init_state")


def test_packed_sequences_equal_separate_forwards(model64):
  """seq_idx: a packed row equals its sequences run alone (Mamba-2 and attention layers);
  Mamba-1 layers have no state resets and raise."""
  ids = tokens(model64.config, (BATCH, LENGTH))
  seq_idx = jnp.asarray([[0] * PREFIX + [1] * (LENGTH - PREFIX)] * BATCH, jnp.int32)
  if model64.config.ssm_layer == "Mamba1":
    with pytest.raises(ValueError, match="seq_idx"):
      model64(ids, seq_idx=seq_idx)
    return
  packed = model64(ids, seq_idx=seq_idx)
  alone = jnp.concatenate([model64(ids[:, :PREFIX]), model64(ids[:, PREFIX:])], axis=1)
  assert_close(packed, alone, TOL_ATTENTION_FLOAT64, "packed")


def test_tied_embedding_is_the_head():
  model = make("hybrid", jnp.float64, seed=1)  # the shapes of model64: compiled already
  ids = tokens(model.config, (BATCH, LENGTH))
  absent = int(np.setdiff1d(np.arange(64), np.asarray(ids))[0])
  before = model(ids)
  emb = model.backbone.embedding.embedding
  emb[...] = emb[...].at[absent].add(1.0)  # a row no input token reads
  changed = np.abs(np.asarray(model(ids) - before)).max(axis=(0, 1)) > 0
  assert changed[absent] and changed.sum() == 1
  untied = nnx.eval_shape(lambda: make("hybrid", tie_embeddings=False))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert model.lm_head is None and untied.lm_head.kernel.shape == (32, 64)
  assert count(untied) - count(model) == 32 * 64


def test_gradients_reach_every_parameter(model64):
  ids = tokens(model64.config, (BATCH, LENGTH))
  graphdef, params = nnx.split(model64, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(np.asarray(g) != 0), f"zero gradient: {name}"


@pytest.mark.slow
def test_bf16_logits_close_to_float32():
  model32 = make("Mamba1", seed=5)
  model16 = make("Mamba1", jnp.bfloat16, seed=5)
  nnx.update(model16, jax.tree.map(lambda p, q: p.astype(q.dtype),
                                   nnx.state(model32, nnx.Param),
                                   nnx.state(model16, nnx.Param)))
  ids = tokens(model32.config, (BATCH, LENGTH), seed=5)
  logits16 = model16(ids)
  assert logits16.dtype == jnp.float32  # logits in float32 whatever the compute dtype
  assert_close(logits16, model32(ids), TOL[jnp.bfloat16], "bf16 logits")


def test_initialisation_scales():
  n_layer = 4
  model = make("Mamba1", seed=6, n_layer=n_layer)
  bound = 1 / math.sqrt(64) / math.sqrt(n_layer)  # out_proj fan_in = d_inner = 64
  for layer in model.backbone.layers:
    w = np.abs(np.asarray(layer.mixer.out_proj.kernel[...]))
    assert w.max() <= bound and w.max() > 0.9 * bound
    w_in = np.abs(np.asarray(layer.mixer.in_proj.kernel[...]))
    assert w_in.max() > 0.9 / math.sqrt(32)  # in_proj keeps U(±1/√d)
  emb = np.asarray(model.backbone.embedding.embedding[...])
  assert abs(emb.std() - 0.02) < 0.002
  # With an MLP: 1/√(2·n_layer) for out_proj and fc2; n_residuals_per_layer overrides.
  config = MambaConfig.tiny("attention")
  for n_res, expect in ((None, 2), (1, 1)):
    model = MambaLM(config, n_residuals_per_layer=n_res, rngs=nnx.Rngs(7))
    for layer in model.backbone.layers:
      for linear in (layer.mixer.out_proj, layer.mlp.fc2):
        w = np.abs(np.asarray(linear.kernel[...]))
        b = 1 / math.sqrt(w.shape[0]) / math.sqrt(expect * config.n_layer)
        assert w.max() <= b and w.max() > 0.8 * b


def test_weight_decay_mask_excludes_ssm_params_norms_biases_and_embeddings():
  model = make("Mamba1", seed=8)
  mask = nnx.to_pure_dict(weight_decay_mask(model))
  layer = mask["backbone"]["layers"][0]
  assert layer["mixer"]["in_proj"]["kernel"] and layer["mixer"]["out_proj"]["kernel"]
  assert layer["mixer"]["x_proj"]["kernel"] and layer["mixer"]["dt_proj"]["kernel"]
  assert not any([layer["mixer"]["A_log"], layer["mixer"]["D"], layer["norm"]["weight"],
                  layer["mixer"]["dt_proj"]["bias"], layer["mixer"]["conv1d"]["bias"],
                  mask["backbone"]["norm_f"]["weight"],
                  mask["backbone"]["embedding"]["embedding"]])
  # AdamW with zero gradients: decayed parameters shrink by lr·wd·p, masked ones stay.
  opt = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.5, mask=weight_decay_mask(model)),
                      wrt=nnx.Param)
  mixer = model.backbone.layers[0].mixer
  a_log, w_in = mixer.A_log[...], mixer.in_proj.kernel[...]
  opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(mixer.A_log[...], a_log)
  np.testing.assert_allclose(mixer.in_proj.kernel[...], w_in * (1 - 0.1 * 0.5), rtol=1e-6)


def test_norms_and_residual_dtypes():
  """LayerNorm = (x − mean)/√(var + eps)·w + b; the residual stream's dtype per
  residual_in_fp32; the branch input in the compute dtype."""
  from mamba_jax.nn.block import Block, Norm
  x = np.random.default_rng(9).standard_normal((3, 5, 16))
  norm = Norm(16, rms=False, eps=1e-5, param_dtype=jnp.float64)
  norm.weight[...] = jnp.linspace(0.5, 1.5, 16)
  norm.bias[...] = jnp.linspace(-1, 1, 16)
  ref = ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
         * np.linspace(0.5, 1.5, 16) + np.linspace(-1, 1, 16))
  assert_close(norm(jnp.asarray(x)), ref, TOL[jnp.float64], "LayerNorm")
  hidden = jnp.asarray(x, jnp.bfloat16)
  for in_fp32, residual_dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
    block = Block(16, nnx.Linear(16, 16, rngs=nnx.Rngs(0)), rms_norm=False,
                  residual_in_fp32=in_fp32, dtype=jnp.bfloat16)
    normed, residual = block._add_norm(hidden, hidden, block.norm)
    assert normed.dtype == jnp.bfloat16 and residual.dtype == residual_dtype
    assert_close(residual, 2 * np.asarray(hidden, np.float64), 0.0, "residual sum")


def test_lm_validation():
  with pytest.raises(ValueError, match="config"):
    MambaLM({"d_model": 8}, rngs=nnx.Rngs(0))
  model = make("Mamba1")
  with pytest.raises(ValueError, match="input_ids"):
    model(jnp.zeros((1, 3), jnp.float32))
  with pytest.raises(ValueError, match="state"):
    model.step(jnp.zeros((1,), jnp.int32), ())
