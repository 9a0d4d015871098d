"""load -> save -> load gives bitwise the same parameters, in every format.

The reference is the parameter set itself (each tensor's bytes and dtype), compared with
the independent reading of the other format or of the original file.
"""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl import flags
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.convert import load_pretrained, save_pretrained
from mamba_jax.convert.hf_layout import read_safetensors, write_safetensors
from mamba_jax.convert.mamba_ssm_layout import (config_from_mamba_ssm, model_state_dict,
                                                param_names, to_mamba_ssm_order)
from mamba_jax.convert.torch_pickle import read_torch_zip, write_torch_zip
from mamba_jax.nn.lm import MambaLM

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "hf"
HF_FIXTURES = ("mamba1_tied_residual_fp32", "mamba1_untied_residual_model_dtype",
               "mamba2_ngroups1", "mamba2_ngroups2")


def assert_same_params(a: MambaLM, b: MambaLM) -> None:
  sa, sb = model_state_dict(a), model_state_dict(b)
  assert sa.keys() == sb.keys()
  for key in sa:
    assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
    assert sa[key].tobytes() == sb[key].tobytes(), key


@pytest.mark.parametrize("name", HF_FIXTURES)
@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_round_trip_is_exact(tmp_path, name, fmt):
  model = load_pretrained(FIXTURES / name)
  save_pretrained(model, tmp_path / "a", format=fmt)
  again = load_pretrained(tmp_path / "a")
  assert_same_params(model, again)
  assert again.config.tie_embeddings == model.config.tie_embeddings
  save_pretrained(again, tmp_path / "b", format=fmt)  # the files are deterministic
  for path in sorted((tmp_path / "a").iterdir()):
    assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_hf_export_holds_the_original_tensors(tmp_path, name):
  save_pretrained(load_pretrained(FIXTURES / name), tmp_path, format="hf")
  original = read_safetensors(FIXTURES / name / "model.safetensors")
  written = read_safetensors(tmp_path / "model.safetensors")
  assert original.keys() == written.keys()  # incl. no lm_head.weight when tied
  for key in original:
    assert original[key].tobytes() == written[key].tobytes(), key
  hf = json.loads((FIXTURES / name / "config.json").read_text())
  ours = json.loads((tmp_path / "config.json").read_text())
  keys = ["architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size",
          "state_size", "expand", "conv_kernel", "tie_word_embeddings", "residual_in_fp32",
          "use_bias", "use_conv_bias", "layer_norm_epsilon"]
  keys += (["time_step_rank"] if hf["model_type"] == "mamba" else  # unused by Mamba-2
           ["head_dim", "num_heads", "n_groups", "chunk_size", "time_step_limit"])
  for key in keys:
    assert ours[key] == hf[key], key


def test_mamba_ssm_format_round_trip(tmp_path):
  source = FIXTURES / "mamba1_tied_residual_fp32_mamba_ssm"
  model = load_pretrained(source)
  save_pretrained(model, tmp_path, format="mamba_ssm")
  torch_written = read_torch_zip(source / "pytorch_model.bin")
  ours = read_torch_zip(tmp_path / "pytorch_model.bin")
  assert torch_written.keys() == ours.keys()
  for key in ours:
    assert torch_written[key].tobytes() == ours[key].tobytes(), key
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
      (source / "config.json").read_text())
  assert_same_params(model, load_pretrained(tmp_path))


def test_orbax_round_trip_and_dtype(tmp_path):
  model = load_pretrained(FIXTURES / "mamba2_ngroups2")
  save_pretrained(model, tmp_path / "orbax", format="orbax")
  assert_same_params(model, load_pretrained(tmp_path / "orbax"))
  bf16 = load_pretrained(tmp_path / "orbax", dtype=jnp.bfloat16)
  assert_same_params(bf16, load_pretrained(FIXTURES / "mamba2_ngroups2", dtype=jnp.bfloat16))


def _in_mamba_ssm_order(model: MambaLM, newer_than: int) -> MambaLM:
  """``model`` with the parameters whose order changed after orbax layout ``newer_than``
  put back in mamba_ssm's order: what that layout's directory held."""
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for name in param_names(model):
    if name.index is not None and name.since > newer_than:
      variable = state[name.path]
      variable[...] = jnp.asarray(to_mamba_ssm_order(np.asarray(variable[...]), name))
  return model


@pytest.mark.parametrize("fixture,permuted", [
    ("mamba2_ngroups2", {1: 2 * 4, 2: 0}),  # per layer: in_proj and conv1d kernel and bias
    ("mamba1_tied_residual_fp32", {1: 2, 2: 2}),  # per layer: in_proj kernel
])
def test_orbax_layout_versions(tmp_path, caplog, fixture, permuted):
  """Orbax directories record layout_version 3 (Mamba-2's grouped in_proj / conv since 2,
  the gated Mamba-1's interleaved in_proj since 3); one written before (no layout.json:
  version 1; or version 2) holds the later-changed parameters in mamba_ssm's order (same
  shapes) and is permuted on loading, with a warning; a newer version raises."""
  model = load_pretrained(FIXTURES / fixture)
  save_pretrained(model, tmp_path / "v3", format="orbax")
  assert json.loads((tmp_path / "v3" / "layout.json").read_text()) == {"layout_version": 3}
  in_proj = lambda m: np.asarray(m.backbone.layers[0].mixer.in_proj.kernel[...])
  for version, count in permuted.items():
    assert len([n for n in param_names(model)
                if n.index is not None and n.since > version]) == count
    old = _in_mamba_ssm_order(load_pretrained(FIXTURES / fixture), version)
    assert np.array_equal(in_proj(old), in_proj(model)) == (count == 0)  # columns moved
    directory = tmp_path / f"v{version}"
    save_pretrained(old, directory, format="orbax")
    if version == 1:
      (directory / "layout.json").unlink()
    else:
      (directory / "layout.json").write_text(json.dumps({"layout_version": version}))
    caplog.clear()
    with caplog.at_level("WARNING"):
      assert_same_params(model, load_pretrained(directory))
    assert (f"orbax layout version {version}" in caplog.text) == (count > 0), caplog.text
  (tmp_path / "v3" / "layout.json").write_text('{"layout_version": 4}')
  with pytest.raises(ValueError, match="layout_version 4, newer than"):
    load_pretrained(tmp_path / "v3")


def test_bfloat16_hf_round_trip(tmp_path):
  model = load_pretrained(FIXTURES / "mamba1_untied_residual_model_dtype", dtype=jnp.bfloat16)
  save_pretrained(model, tmp_path, format="hf")
  written = read_safetensors(tmp_path / "model.safetensors")
  assert written["backbone.embeddings.weight"].dtype == ml_dtypes.bfloat16
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  assert_same_params(model, load_pretrained(tmp_path, dtype=jnp.bfloat16))


@pytest.mark.parametrize("config", [
    MambaConfig.tiny("hybrid"),
    MambaConfig.tiny("Mamba1").replace(rms_norm=False, tie_embeddings=False,
                                       norm_epsilon=1e-6),
], ids=["hybrid", "layernorm"])
def test_models_hf_cannot_hold_round_trip_through_mamba_ssm_and_orbax(tmp_path, config):
  model = MambaLM(config, rngs=nnx.Rngs(3))
  with pytest.raises(ValueError, match="HF transformers cannot express"):
    save_pretrained(model, tmp_path / "hf", format="hf")
  for fmt in ("mamba_ssm", "orbax"):
    save_pretrained(model, tmp_path / fmt, format=fmt)
    again = load_pretrained(tmp_path / fmt)
    if fmt == "orbax":
      assert again.config == model.config
    else:  # attn_cfg is rewritten in mamba_ssm's terms: the same attention, other keys
      ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % config.vocab_size
      np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
    assert_same_params(model, again)


def test_attention_config_follows_mamba_ssm_defaults(tmp_path):
  """mamba_ssm's MHA: no rotary unless rotary_emb_dim > 0, non-causal unless causal is given."""
  raw = MambaConfig.tiny("hybrid").to_dict()
  raw["attn_cfg"] = {"num_heads": 2}
  config = config_from_mamba_ssm(raw)
  assert config.attn_cfg["positions"] == "none" and config.attn_cfg["causal"] is False
  raw["attn_cfg"] = {"num_heads": 2, "rotary_emb_dim": 8, "causal": True}
  assert config_from_mamba_ssm(raw).attn_cfg["positions"] == "rope"

  model = MambaLM(MambaConfig.tiny("hybrid"), rngs=nnx.Rngs(0))  # RoPE over the whole head
  save_pretrained(model, tmp_path, format="mamba_ssm")
  written = json.loads((tmp_path / "config.json").read_text())["attn_cfg"]
  head_dim = model.config.d_model // written["num_heads"]
  assert "positions" not in written and written["causal"] is True
  assert written["rotary_emb_dim"] == model.config.attn_cfg.get("head_dim", head_dim)

  absolute = MambaConfig.tiny("hybrid").replace(
      attn_cfg={**MambaConfig.tiny("hybrid").attn_cfg, "positions": "absolute"})
  with pytest.raises(ValueError, match="absolute"):
    save_pretrained(MambaLM(absolute, rngs=nnx.Rngs(0)), tmp_path / "abs", format="mamba_ssm")
  xpos = MambaConfig.tiny("hybrid").replace(
      attn_cfg={**MambaConfig.tiny("hybrid").attn_cfg, "positions": "xpos"})
  with pytest.raises(ValueError, match="xPos"):
    save_pretrained(MambaLM(xpos, rngs=nnx.Rngs(0)), tmp_path / "xpos", format="mamba_ssm")


def test_cli_converts_between_formats(tmp_path):
  spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                REPO / "scripts" / "convert_checkpoint.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  source = FIXTURES / "mamba2_ngroups1"
  steps = [(source, tmp_path / "ssm", "mamba_ssm"),
           (tmp_path / "ssm", tmp_path / "orbax", "orbax"),
           (tmp_path / "orbax", tmp_path / "hf", "hf")]
  try:
    for src, dst, fmt in steps:
      flags.FLAGS(["convert_checkpoint", f"--input={src}", f"--output={dst}", f"--to={fmt}"])
      cli.main(["convert_checkpoint"])
  finally:
    flags.FLAGS.unparse_flags()
  assert not (tmp_path / "ssm" / "expected.safetensors").exists()  # not copied as a side file
  written = read_safetensors(tmp_path / "hf" / "model.safetensors")
  for key, value in read_safetensors(source / "model.safetensors").items():
    assert value.tobytes() == written[key].tobytes(), key


def test_sharded_and_bin_hf_checkpoints_load_the_same(tmp_path):
  source = FIXTURES / "mamba2_ngroups1"
  model = load_pretrained(source)
  tensors = read_safetensors(source / "model.safetensors")
  names = sorted(tensors)
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_bytes((source / "config.json").read_bytes())
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
    shard = f"model-{i + 1:05d}-of-00002.safetensors"
    write_safetensors(sharded / shard, {k: tensors[k] for k in part})
    weight_map.update({k: shard for k in part})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  assert_same_params(model, load_pretrained(sharded))
  binary = tmp_path / "bin"  # older HF snapshots ship HF-named pytorch_model.bin only
  binary.mkdir()
  (binary / "config.json").write_bytes((source / "config.json").read_bytes())
  write_torch_zip(binary / "pytorch_model.bin", {k: np.array(v) for k, v in tensors.items()})
  assert_same_params(model, load_pretrained(binary))
