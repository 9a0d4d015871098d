"""HF transformers' layout of Mamba / Mamba-2: config.json keys, tensor names, safetensors.

``MambaForCausalLM`` and ``Mamba2ForCausalLM`` hold the same tensors as mamba_ssm under the
same names, except ``backbone.embeddings.weight`` (mamba_ssm: ``backbone.embedding.weight``),
and a tied ``lm_head.weight`` is left out of the file. So HF ⇄ ours goes through
:mod:`mamba_jax.convert.mamba_ssm_layout`, renaming the embedding.

Config keys (HF -> MambaConfig; HF's vocab_size is the embedding's row count, already
padded, so pad_vocab_size_multiple = 1):

  hidden_size -> d_model          num_hidden_layers -> n_layer     vocab_size -> vocab_size
  tie_word_embeddings -> tie_embeddings (default: True for Mamba, False for Mamba-2)
  residual_in_fp32 -> residual_in_fp32    layer_norm_epsilon -> norm_epsilon (RMSNorm always)
  ssm_cfg, Mamba (layer "Mamba1"):
    state_size -> d_state   conv_kernel -> d_conv   expand -> expand   time_step_rank -> dt_rank
    time_step_min/max/floor -> dt_min/dt_max/dt_init_floor   time_step_scale -> dt_scale
    time_step_init_scheme -> dt_init   use_bias -> bias   use_conv_bias -> conv_bias
  ssm_cfg, Mamba-2 (layer "Mamba2"):
    state_size -> d_state   conv_kernel -> d_conv   expand -> expand   head_dim -> headdim
    n_groups -> ngroups   chunk_size -> chunk_size   time_step_limit -> dt_limit
    time_step_min/max/floor -> dt_min/dt_max/dt_init_floor   use_bias -> bias
    use_conv_bias -> conv_bias; num_heads must equal expand·hidden_size / head_dim

HF's Mamba-2 always has the gated RMSNorm with norm_before_gate=False and eps =
layer_norm_epsilon, and no d_ssm / D_has_hdim options; configs asking otherwise raise, as
does exporting a model HF cannot express (LayerNorm, attention layers, MLPs, H3, ...).
Keys that only concern HF's runtime, initialisation or tokenizer are ignored; unknown keys
are logged. HF writes an infinite time_step_limit bound as ``{"__float__": "Infinity"}``.

safetensors files are read by parsing their header (a JSON table of dtypes, shapes and byte
ranges) over a memory map, which handles bfloat16 (``ml_dtypes``), and written with
``safetensors.serialize_file`` with HF's ``{"format": "pt"}`` metadata.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import TensorSpec, serialize_file

from mamba_jax.config import MambaConfig
from mamba_jax.convert.mamba_ssm_layout import (CONFIG_NAME, EMBEDDING, LM_HEAD,
                                                TORCH_WEIGHTS_NAME, model_from_state_dict,
                                                model_state_dict, read_json)
from mamba_jax.convert.torch_pickle import load_torch_state_dict
from mamba_jax.nn.lm import MambaLM

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
HF_EMBEDDING = "backbone.embeddings.weight"
ARCHITECTURES = {"MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2"}

# Keys that do not change the forward pass: HF runtime switches, init, tokenizer, bookkeeping.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "use_mambapy", "use_associative_scan", "initializer_range",
    "rescale_prenorm_residual", "pad_token_id", "bos_token_id", "eos_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "_name_or_path",
    "intermediate_size", "is_encoder_decoder", "tokenizer_class", "fused_add_norm",
    "pad_vocab_size_multiple", "d_intermediate", "attn_layer_idx", "attn_cfg", "ssm_cfg",
    "emb_initializer_range", "layer_types", "chunk_size_feed_forward", "n_layer",
}
_MAMBA1_KEYS = {"hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings",
                "residual_in_fp32", "layer_norm_epsilon", "hidden_act", "state_size",
                "conv_kernel", "expand", "time_step_rank", "time_step_min", "time_step_max",
                "time_step_floor", "time_step_scale", "time_step_init_scheme", "use_bias",
                "use_conv_bias", "rms_norm"}
_MAMBA2_KEYS = (_MAMBA1_KEYS - {"time_step_scale", "time_step_init_scheme"}) | {
    "head_dim", "num_heads", "n_groups", "chunk_size", "time_step_limit", "norm_before_gate"}
_MAMBA2_NORM_EPS = 1e-5  # the gated norm's eps in mamba_jax's (and mamba_ssm's) Mamba-2.

# safetensors dtype names <-> numpy.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# Config.


def model_type_of(raw: Mapping[str, Any], source: str) -> str:
  """"mamba" or "mamba2" from an HF config's architectures / model_type; ValueError else."""
  architectures = raw.get("architectures") or []
  known = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
  if architectures and not known:
    raise ValueError(f"{source}: architectures {architectures} are not supported; "
                     f"mamba_jax converts {sorted(ARCHITECTURES)}")
  model_type = known[0] if known else raw.get("model_type")
  if model_type not in ("mamba", "mamba2"):
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; mamba_jax "
                     "converts HF model_type 'mamba' and 'mamba2' (MambaForCausalLM, "
                     "Mamba2ForCausalLM)")
  return model_type


def _get(raw: Mapping[str, Any], key: str, default: Any = None) -> Any:
  value = raw.get(key, default)
  if value is None:
    raise ValueError(f"HF config.json lacks {key!r}, which mamba_jax needs")
  return value


def config_from_hf(raw: Mapping[str, Any], source: str = "config.json") -> MambaConfig:
  """An HF Mamba / Mamba-2 config.json dict -> MambaConfig (see the module docstring)."""
  model_type = model_type_of(raw, source)
  known = _MAMBA1_KEYS if model_type == "mamba" else _MAMBA2_KEYS
  unknown = sorted(set(raw) - known - _IGNORED_KEYS)
  if unknown:
    logging.warning("%s: ignoring HF config keys unknown to mamba_jax: %s", source, unknown)
  if not raw.get("rms_norm", True):
    raise ValueError(f"{source}: rms_norm=false, but HF's Mamba models always use RMSNorm; "
                     "the file is ambiguous")
  if raw.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r}; Mamba blocks use 'silu'")
  d_model = _get(raw, "hidden_size")
  expand = _get(raw, "expand", 2)
  eps = float(raw.get("layer_norm_epsilon", 1e-5))
  common = dict(d_state=_get(raw, "state_size", 16), d_conv=_get(raw, "conv_kernel", 4),
                expand=expand, dt_min=float(raw.get("time_step_min", 0.001)),
                dt_max=float(raw.get("time_step_max", 0.1)),
                dt_init_floor=float(raw.get("time_step_floor", 1e-4)),
                bias=bool(raw.get("use_bias", False)),
                conv_bias=bool(raw.get("use_conv_bias", True)))
  if model_type == "mamba":
    ssm_cfg = dict(layer="Mamba1", **common, dt_rank=raw.get("time_step_rank", "auto"),
                   dt_scale=float(raw.get("time_step_scale", 1.0)),
                   dt_init=raw.get("time_step_init_scheme", "random"))
  else:
    if raw.get("norm_before_gate", False):
      raise ValueError(f"{source}: norm_before_gate=true, but HF's Mamba2 always gates "
                       "before its norm; the file is ambiguous")
    if eps != _MAMBA2_NORM_EPS:
      raise ValueError(f"{source}: layer_norm_epsilon={eps} is also the eps of HF's Mamba-2 "
                       f"gated norm, which mamba_jax's Mamba2Mixer fixes at {_MAMBA2_NORM_EPS}")
    headdim, n_heads = _get(raw, "head_dim", 64), _get(raw, "num_heads", 128)
    if int(expand * d_model) != n_heads * headdim:
      raise ValueError(f"{source}: num_heads ({n_heads}) * head_dim ({headdim}) must equal "
                       f"expand ({expand}) * hidden_size ({d_model})")
    limit = tuple(float(v) for v in raw.get("time_step_limit", (0.0, math.inf)))
    ssm_cfg = dict(layer="Mamba2", **common, headdim=headdim, ngroups=_get(raw, "n_groups", 8),
                   chunk_size=_get(raw, "chunk_size", 256), dt_limit=limit, rmsnorm=True,
                   norm_before_gate=False)
  return MambaConfig(
      d_model=d_model, d_intermediate=0, n_layer=_get(raw, "num_hidden_layers"),
      vocab_size=_get(raw, "vocab_size"), ssm_cfg=ssm_cfg, rms_norm=True,
      residual_in_fp32=bool(raw.get("residual_in_fp32", True)), pad_vocab_size_multiple=1,
      tie_embeddings=bool(raw.get("tie_word_embeddings", model_type == "mamba")),
      norm_epsilon=eps)


def _encode_special_floats(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return {"__float__": "NaN" if math.isnan(value) else
            ("Infinity" if value > 0 else "-Infinity")}
  if isinstance(value, (list, tuple)):
    return [_encode_special_floats(v) for v in value]
  return value


def _integral(name: str, value: Any) -> int:
  if float(value) != int(value):
    raise ValueError(f"HF needs an integer {name}, got {value!r}")
  return int(value)


def config_to_hf(config: MambaConfig) -> dict[str, Any]:
  """MambaConfig -> an HF config.json dict; ValueError naming what HF cannot express."""
  layer = config.ssm_layer
  problems = []
  if layer not in ("Mamba1", "Mamba2"):
    problems.append(f"ssm_cfg layer {layer!r} (HF has Mamba and Mamba-2 only)")
  if config.attn_layer_idx:
    problems.append(f"attention layers {list(config.attn_layer_idx)}")
  if config.d_intermediate:
    problems.append(f"an MLP (d_intermediate={config.d_intermediate})")
  if not config.rms_norm:
    problems.append("LayerNorm (rms_norm=False)")
  kw = config.ssm_kwargs
  if layer == "Mamba1":
    for key, default in (("ssm_kind", "s6"), ("selective", None), ("A_init", "s4d_real")):
      if kw.get(key, default) != default:
        problems.append(f"ssm_cfg {key}={kw[key]!r}")
  if layer == "Mamba2":
    if kw.get("d_ssm") not in (None, kw.get("expand", 2) * config.d_model):
      problems.append(f"ssm_cfg d_ssm={kw['d_ssm']!r} < d_inner (HF has no MLP branch)")
    for key, default in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
      if kw.get(key, default) != default:
        problems.append(f"ssm_cfg {key}={kw[key]!r}")
    if config.norm_epsilon != _MAMBA2_NORM_EPS:
      problems.append(f"norm_epsilon={config.norm_epsilon} (HF's Mamba-2 uses it for the "
                      f"gated norm too, mamba_jax's is {_MAMBA2_NORM_EPS})")
  if problems:
    raise ValueError("HF transformers cannot express this model: " + "; ".join(problems) +
                     ". Save it with format='mamba_ssm' or 'orbax' instead.")
  expand = _integral("expand", kw.get("expand", 2))
  out = dict(hidden_size=config.d_model, num_hidden_layers=config.n_layer,
             vocab_size=config.vocab_size_padded, tie_word_embeddings=config.tie_embeddings,
             residual_in_fp32=config.residual_in_fp32, layer_norm_epsilon=config.norm_epsilon,
             hidden_act="silu", expand=expand, conv_kernel=kw.get("d_conv", 4),
             time_step_min=kw.get("dt_min", 0.001), time_step_max=kw.get("dt_max", 0.1),
             time_step_floor=kw.get("dt_init_floor", 1e-4), use_bias=kw.get("bias", False),
             use_conv_bias=kw.get("conv_bias", True))
  if layer == "Mamba1":
    dt_rank = kw.get("dt_rank", "auto")
    out.update(architectures=["MambaForCausalLM"], model_type="mamba",
               state_size=kw.get("d_state", 16),
               time_step_rank=math.ceil(config.d_model / 16) if dt_rank == "auto" else dt_rank,
               time_step_scale=kw.get("dt_scale", 1.0),
               time_step_init_scheme=kw.get("dt_init", "random"))
  else:
    headdim = kw.get("headdim", 64)
    out.update(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
               state_size=kw.get("d_state", 128), head_dim=headdim,
               num_heads=expand * config.d_model // headdim, n_groups=kw.get("ngroups", 1),
               chunk_size=kw.get("chunk_size", 256),
               time_step_limit=_encode_special_floats(
                   list(kw.get("dt_limit", (0.0, math.inf)))))
  return out


# safetensors.


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file, memory-mapped (bfloat16 as ml_dtypes.bfloat16)."""
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
      raise ValueError(f"{path} is not a safetensors file (header length {header_len})")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not a safetensors file (bad header: {e})") from e
  header.pop("__metadata__", None)
  start = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size - start,)) \
      if size > start else np.zeros((0,), np.uint8)
  out = {}
  for name, info in header.items():
    if info.get("dtype") not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which "
                       f"mamba_jax does not read; expected one of {sorted(_ST_DTYPES)}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name!r} has byte range {info['data_offsets']} that "
                       f"does not fit shape {shape} of {info['dtype']} or the file")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes {name: array} with HF's metadata {"format": "pt"}."""
  specs, keep = {}, []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in _ST_NAMES:
      raise ValueError(f"write_safetensors: {name!r} has dtype {array.dtype}; expected one of "
                       f"{sorted(map(str, _ST_NAMES))}")
    keep.append(array)
    specs[name] = TensorSpec(dtype=array.dtype.name, shape=list(array.shape),
                             data_ptr=array.ctypes.data, data_len=array.nbytes)
  serialize_file(specs, str(path), metadata={"format": "pt"})
  del keep


# The HF directory format.


def _read_hf_weights(directory: Path) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of an HF directory: model.safetensors, its sharded index, or a .bin."""
  single, index = directory / SAFETENSORS_NAME, directory / SAFETENSORS_INDEX_NAME
  if single.is_file():
    return read_safetensors(single), str(single)
  if index.is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no weight_map")
    state = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_safetensors(directory / shard))
    return state, str(index)
  if (directory / TORCH_WEIGHTS_NAME).is_file():
    return load_torch_state_dict(directory / TORCH_WEIGHTS_NAME), str(directory /
                                                                      TORCH_WEIGHTS_NAME)
  raise FileNotFoundError(f"{directory} has an HF config.json but no weights: expected "
                          f"{SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}")


def load_hf(directory: Path, raw_config: Mapping[str, Any], *,
            dtype: Any = jnp.float32) -> MambaLM:
  """Reads an HF MambaForCausalLM / Mamba2ForCausalLM directory."""
  config = config_from_hf(raw_config, str(directory / CONFIG_NAME))
  hf_state, source = _read_hf_weights(directory)
  state = {}
  for name, array in hf_state.items():
    renamed = EMBEDDING if name in (HF_EMBEDDING, EMBEDDING) else name
    if renamed in state:
      raise ValueError(f"{source} holds both {HF_EMBEDDING} and {EMBEDDING}")
    state[renamed] = array
  return model_from_state_dict(config, state, dtype=dtype, source=source)


def save_hf(model: MambaLM, directory: Path) -> None:
  """Writes ``config.json`` + ``model.safetensors`` that HF's from_pretrained loads."""
  hf_config = config_to_hf(model.config)
  state = model_state_dict(model)
  hf_config["dtype"] = str(state[EMBEDDING].dtype)
  if model.config.tie_embeddings:
    del state[LM_HEAD]
  state = {HF_EMBEDDING if k == EMBEDDING else k: v for k, v in sorted(state.items())}
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / SAFETENSORS_NAME, state)
  (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
