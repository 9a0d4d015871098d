"""Tests of MambaConfig: validation, derived properties, config.json round trips, presets and
their parameter counts (abstract initialisation, nothing allocated)."""

import dataclasses
import inspect
import math

import jax
import pytest
from flax import nnx

from mamba_jax.config import (ATTN_CFG_KEYS, IMPLEMENTATION_KEYS, PRESET_NAMES, PRESETS,
                              SSM_CFG_KEYS, MambaConfig, preset)
from mamba_jax.nn.attention import Attention
from mamba_jax.nn.block import Block
from mamba_jax.nn.lm import MambaLM, _mixer
from mamba_jax.nn.mlp import GatedMLP

# Parameter counts of the released Mamba-1 checkpoints (state-spaces/mamba-*-hf, as the
# Hugging Face hub reports them: tied embedding counted once).
RELEASED_MAMBA1 = {
    "mamba-130m": 129_135_360,
    "mamba-370m": 371_516_416,
    "mamba-790m": 793_204_224,
    "mamba-1.4b": 1_372_178_432,
    "mamba-2.8b": 2_768_345_600,
}
NOMINAL = {
    "mamba2-130m": 130e6, "mamba2-370m": 370e6, "mamba2-780m": 780e6, "mamba2-1.3b": 1.3e9,
    "mamba2-2.7b": 2.7e9, "transformerpp-125m": 125e6, "transformerpp-350m": 350e6,
    "transformerpp-760m": 760e6, "transformerpp-1.3b": 1.3e9, "transformerpp-2.7b": 2.7e9,
}

# Released config.json files: an old Mamba-1 one (before d_intermediate/attention existed)
# and a Mamba-2 one.
MAMBA_130M_JSON = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                   "pad_vocab_size_multiple": 8}
MAMBA2_130M_JSON = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                    "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                    "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_lm(config: MambaConfig) -> int:
  """Parameters of the whole model, from an abstract initialisation."""
  model = nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))
  return count(nnx.state(model, nnx.Param))


def count_by_layer(config: MambaConfig) -> int:
  """Embedding + final norm + Σ layers, each layer initialised abstractly on its own."""
  d = config.d_model

  def block(i):
    mlp = (GatedMLP(d, hidden_features=config.d_intermediate, rngs=nnx.Rngs(0))
           if config.d_intermediate else None)
    return Block(d, _mixer(config, i, jax.numpy.float32, jax.numpy.float32, nnx.Rngs(0)), mlp)

  per_kind = {}
  for i, kind in enumerate(config.layer_kinds):
    if kind not in per_kind:
      per_kind[kind] = count(nnx.state(nnx.eval_shape(lambda: block(i)), nnx.Param))
  head = 0 if config.tie_embeddings else d * config.vocab_size_padded
  return (config.vocab_size_padded * d + d + head
          + sum(per_kind[kind] for kind in config.layer_kinds))


def mamba2_formula(d: int, n_layer: int, vocab: int, n: int = 128, p: int = 64) -> int:
  """mamba_ssm Mamba2 tensor shapes (expand 2, ngroups 1, conv 4, rmsnorm, D per head)."""
  e, h = 2 * d, 2 * d // p
  layer = (d * (2 * e + 2 * n + h) + (e + 2 * n) * 5 + 3 * h + e + e * d + d)
  return vocab * d + d + n_layer * layer


@pytest.mark.parametrize("changes,field", [
    (dict(d_model=0), "d_model"),
    (dict(n_layer=-1), "n_layer"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(pad_vocab_size_multiple=0), "pad_vocab_size_multiple"),
    (dict(d_intermediate=-1), "d_intermediate"),
    (dict(norm_epsilon=0.0), "norm_epsilon"),
    (dict(attn_layer_idx=(2,), attn_cfg={"num_heads": 2}), "attn_layer_idx"),
    (dict(attn_layer_idx=(0, 0), attn_cfg={"num_heads": 2}), "attn_layer_idx"),
    (dict(attn_layer_idx=(0,)), "attn_cfg"),
    (dict(ssm_cfg={"layer": "Mamba3"}), r"ssm_cfg\['layer'\]"),
    (dict(ssm_cfg={"layer": "Mamba1", "headdim": 64}), r"ssm_cfg.*headdim"),
    (dict(ssm_cfg={"layer": "Mamba2", "dt_rank": 4}), r"ssm_cfg.*dt_rank"),
    (dict(attn_cfg={"num_heads": 2, "dropout": 0.1}), r"attn_cfg.*dropout"),
])
def test_validation_names_the_field(changes, field):
  with pytest.raises(ValueError, match=f"MambaConfig.{field}"):
    MambaConfig(**{"d_model": 16, "n_layer": 2, "vocab_size": 10, **changes})


def test_derived_properties():
  assert preset("mamba-130m").vocab_size_padded == 50280
  assert preset("mamba2-130m").vocab_size_padded == 50288
  assert MambaConfig.tiny().vocab_size_padded == 64
  hybrid = MambaConfig.tiny("hybrid")
  assert hybrid.layer_kinds == ("Mamba2", "attention", "Mamba2")
  assert hybrid.n_residuals_per_layer == 2 and MambaConfig.tiny().n_residuals_per_layer == 1
  assert MambaConfig(n_layer=2, ssm_cfg={}).ssm_layer == "Mamba1"  # mamba_ssm's default
  cfg = MambaConfig(d_model=8, n_layer=1, ssm_cfg={"layer": "Mamba1", "d_state": 4,
                                                    "use_fast_path": True})
  assert cfg.ssm_kwargs == {"d_state": 4}  # "layer" and PyTorch kernel switches dropped


def test_frozen_hashable_immutable():
  cfg = MambaConfig.tiny("hybrid")
  assert hash(cfg) == hash(MambaConfig.tiny("hybrid")) and cfg == MambaConfig.tiny("hybrid")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3
  with pytest.raises((TypeError, ValueError), match="immutable"):
    cfg.ssm_cfg["d_state"] = 3
  assert isinstance(cfg.attn_layer_idx, tuple)
  assert cfg.replace(n_layer=4).n_layer == 4 and cfg.n_layer == 3


def test_config_json_round_trip():
  old = MambaConfig.from_dict(MAMBA_130M_JSON)
  assert old == preset("mamba-130m")
  assert old.to_dict() == {**MAMBA_130M_JSON, "d_intermediate": 0, "attn_layer_idx": [],
                           "attn_cfg": {}, "tie_embeddings": True}
  new = MambaConfig.from_dict(MAMBA2_130M_JSON)
  assert new == preset("mamba2-130m") and new.to_dict() == MAMBA2_130M_JSON
  hybrid = MambaConfig.tiny("hybrid")
  assert MambaConfig.from_dict(hybrid.to_dict()) == hybrid
  with pytest.raises(ValueError, match="unknown keys"):
    MambaConfig.from_dict({**MAMBA2_130M_JSON, "n_layers": 3})


def test_preset_lookup():
  assert set(PRESET_NAMES) == set(PRESETS) and len(PRESET_NAMES) == 15
  with pytest.raises(ValueError, match="mamba-130m"):
    preset("mamba-1b")
  with pytest.raises(ValueError, match="layer"):
    MambaConfig.tiny("Mamba3")
  tpp = preset("transformerpp-350m")
  assert tpp.layer_kinds == ("attention",) * 24 and tpp.d_intermediate == 2816
  assert tpp.attn_cfg["num_heads"] == 16 and tpp.attn_cfg["rotary_emb_dim"] == 64


def test_cfg_keys_match_the_constructors():
  from mamba_jax.nn.lm import MIXERS
  not_cfg = {"self", "d_model", "layer_idx", "dtype", "param_dtype", "rngs"}
  for kind, keys in [*SSM_CFG_KEYS.items(), ("attention", ATTN_CFG_KEYS)]:
    params = set(inspect.signature(MIXERS[kind].__init__).parameters) - not_cfg
    assert params == set(keys), kind
  assert not set(IMPLEMENTATION_KEYS) & set().union(*SSM_CFG_KEYS.values())
  assert MIXERS["attention"] is Attention


def test_attn_positions_validated():
  from mamba_jax.config import ATTN_POSITIONS
  from mamba_jax.nn.attention import POSITIONS
  assert ATTN_POSITIONS == POSITIONS
  base = dict(d_model=16, n_layer=1, vocab_size=8, attn_layer_idx=(0,))
  assert MambaConfig(**base, attn_cfg={"num_heads": 2, "positions": "xpos"}).attn_cfg
  with pytest.raises(ValueError, match="positions.*'alibi'.*xpos"):
    MambaConfig(**base, attn_cfg={"num_heads": 2, "positions": "alibi"})


@pytest.mark.parametrize("name", ["mamba-130m", "mamba2-130m", "transformerpp-125m"])
def test_whole_model_count_equals_layerwise_count(name):
  assert count_lm(PRESETS[name]) == count_by_layer(PRESETS[name])


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_counts(name):
  config = PRESETS[name]
  n = count_by_layer(config)
  if name in RELEASED_MAMBA1:
    assert n == RELEASED_MAMBA1[name]
    return
  if name.startswith("mamba2"):
    assert n == mamba2_formula(config.d_model, config.n_layer, config.vocab_size_padded)
  assert abs(n / NOMINAL[name] - 1) < 0.05, n


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_counts_whole_model(name):
  assert count_lm(PRESETS[name]) == count_by_layer(PRESETS[name])
