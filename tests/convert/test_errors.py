"""Bad checkpoint directories and configs raise errors that name what is wrong."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from mamba_jax.config import MambaConfig
from mamba_jax.convert import load_pretrained, save_pretrained
from mamba_jax.convert.hf_layout import (config_from_hf, config_to_hf, read_safetensors,
                                         write_safetensors)
from mamba_jax.convert.mamba_ssm_layout import decode_special_floats, read_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
MAMBA1 = FIXTURES / "mamba1_tied_residual_fp32"
MAMBA2 = FIXTURES / "mamba2_ngroups1"


def _copy(source: Path, target: Path, **config_changes) -> Path:
  shutil.copytree(source, target)
  if config_changes:
    raw = json.loads((target / "config.json").read_text())
    raw.update(config_changes)
    (target / "config.json").write_text(json.dumps(raw))
  return target


def _hf_config(source: Path = MAMBA2, **changes) -> dict:
  raw = json.loads((source / "config.json").read_text())
  raw.update(changes)
  return raw


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    load_pretrained(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    load_pretrained(tmp_path)


def test_missing_weights(tmp_path):
  hf = _copy(MAMBA1, tmp_path / "hf")
  (hf / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no weights: expected model.safetensors"):
    load_pretrained(hf)
  ssm = _copy(FIXTURES / "mamba1_tied_residual_fp32_mamba_ssm", tmp_path / "ssm")
  (ssm / "pytorch_model.bin").unlink()
  with pytest.raises(FileNotFoundError, match="expected pytorch_model.bin"):
    load_pretrained(ssm)


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "LlamaForCausalLM"),
    (dict(architectures=["MambaModel"]), "MambaModel"),
    (dict(architectures=None, model_type="falcon_mamba"), "falcon_mamba"),
])
def test_unknown_architecture(tmp_path, changes, message):
  with pytest.raises(ValueError, match=message):
    load_pretrained(_copy(MAMBA1, tmp_path / "m", **changes))


def test_config_of_no_known_kind(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
  with pytest.raises(ValueError, match="neither an HF config"):
    load_pretrained(tmp_path)


def test_weights_that_do_not_fit(tmp_path):
  missing = _copy(MAMBA1, tmp_path / "missing")
  tensors = dict(read_safetensors(missing / "model.safetensors"))
  del tensors["backbone.layers.1.mixer.D"]
  write_safetensors(missing / "model.safetensors", tensors)
  with pytest.raises(ValueError, match=r"missing backbone\.layers\.1\.mixer\.D"):
    load_pretrained(missing)
  with pytest.raises(ValueError, match=r"mixer\.A_log has shape \(32, 4\)"):
    load_pretrained(_copy(MAMBA1, tmp_path / "shape", state_size=8))
  untied = _copy(MAMBA1, tmp_path / "tied")
  tensors = dict(read_safetensors(untied / "model.safetensors"))
  tensors["lm_head.weight"] = np.zeros_like(tensors["backbone.embeddings.weight"])
  write_safetensors(untied / "model.safetensors", tensors)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    load_pretrained(untied)


@pytest.mark.parametrize("changes,message", [
    (dict(norm_before_gate=True), "norm_before_gate"),
    (dict(rms_norm=False), "rms_norm"),
    (dict(num_heads=3), r"num_heads \(3\) \* head_dim"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_hf_configs_mamba_jax_cannot_follow(changes, message):
  with pytest.raises(ValueError, match=message):
    config_from_hf(_hf_config(**changes))


def test_hf_config_special_floats_and_round_trip(tmp_path):
  raw = _hf_config(time_step_limit=[0.0, {"__float__": "Infinity"}])
  config = config_from_hf(decode_special_floats(raw))
  assert config.ssm_kwargs["dt_limit"] == (0.0, math.inf)
  # Older transformers wrote a bare Infinity, which Python's json reads.
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(time_step_limit=[0.0, math.inf])))
  assert config_from_hf(read_json(tmp_path / "config.json")) == config
  assert config_to_hf(config)["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
  assert config_from_hf(decode_special_floats(config_to_hf(config))) == config


@pytest.mark.parametrize("config,message", [
    (MambaConfig.tiny("H3"), "layer 'H3'"),
    (MambaConfig.tiny("hybrid"), r"attention layers \[1\]; an MLP"),
    (MambaConfig.tiny("Mamba2").replace(rms_norm=False), "LayerNorm"),
    (MambaConfig.tiny("Mamba2").replace(
        ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=16, D_has_hdim=True)), "D_has_hdim"),
])
def test_hf_export_refuses_what_hf_cannot_express(config, message):
  with pytest.raises(ValueError, match=message):
    config_to_hf(config)


def test_save_pretrained_arguments(tmp_path):
  model = load_pretrained(MAMBA1)
  with pytest.raises(ValueError, match="format='safetensors' is not one of"):
    save_pretrained(model, tmp_path, format="safetensors")
  save_pretrained(model, tmp_path / "m", format="mamba_ssm")
  with pytest.raises(ValueError, match=r"already holds \['pytorch_model.bin'\]"):
    save_pretrained(model, tmp_path / "m", format="hf")
