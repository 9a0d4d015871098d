"""mamba_ssm's checkpoint layout: PyTorch parameter names and shapes ⇄ a ``MambaLM``'s state.

A ``MambaLM``'s parameters are named after mamba_ssm's module attributes, so a parameter's
mamba_ssm name is its ``nnx.state`` path joined with dots, with three changes of layout
decided by the module that holds it:

  flax                                     PyTorch (mamba_ssm)
  nnx.Linear       kernel (in, out)        Linear.weight (out, in)          transposed
  nnx.Embed        embedding (v, d)        Embedding.weight (v, d)          renamed only
  CausalConv1d     kernel (c, w)           Conv1d.weight (c, 1, w)          middle axis
  anything else    name, shape             the same

e.g. ``backbone.layers.3.mixer.in_proj.kernel`` (d, 2e) ⇄ ``backbone.layers.3.mixer.in_proj.
weight`` (2e, d). Two mixers moreover store columns in another order than mamba_ssm, for
tensor parallelism to split them over devices:

  Mamba-2          in_proj (kernel columns, bias) and conv (kernel and bias channels) group
                   by group (``mamba_jax.nn.mamba2``'s grouped layout); files hold
                   mamba_ssm's [z0, x0, z, x, B, C, dt] / [x, B, C]
  gated Mamba-1    in_proj (kernel columns, bias) interleaved per channel, (x_0, z_0, x_1,
                   z_1, ...) (``mamba_jax.nn.mamba1``'s layout); files hold mamba_ssm's
                   (and HF's) [x, z] rows of ``in_proj.weight`` (2e, d)

The fixed permutations (``mamba2.mamba_ssm_order``, ``mamba1.mamba_ssm_order``) are
applied on reading and undone on writing, so files keep mamba_ssm's order and round-trip
bit-exactly.

With tied embeddings the model has no ``lm_head``; mamba_ssm's state dict still holds
``lm_head.weight``, the embedding's own tensor, which is written as such and, on reading,
checked equal to the embedding.

The mamba_ssm directory format is ``config.json`` (``MambaConfig.to_dict()``, written with
Python's json like mamba_ssm's ``save_pretrained``, so an infinite ``dt_limit`` bound is
``Infinity``) plus ``pytorch_model.bin`` (``torch.save`` of the state dict).

Letter legend: d d_model, e d_inner, c conv channels, w conv width, v padded vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.convert.torch_pickle import load_torch_state_dict, write_torch_zip
from mamba_jax.nn.lm import MambaLM
from mamba_jax.nn.mamba1 import Mamba1Mixer
from mamba_jax.nn.mamba2 import CausalConv1d, Mamba2Mixer

CONFIG_NAME = "config.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
EMBEDDING = "backbone.embedding.weight"
LM_HEAD = "lm_head.weight"

_LINEAR, _CONV, _PLAIN = "linear", "conv", "plain"


@dataclasses.dataclass(frozen=True)
class ParamName:
  """One parameter: its ``nnx.state`` path, its mamba_ssm name, and the layout change."""

  path: tuple[Any, ...]
  torch_name: str
  layout: str  # "linear" (transpose), "conv" (insert the middle axis) or "plain"
  # Mamba-2's grouped in_proj / conv, gated Mamba-1's interleaved in_proj: ours =
  # theirs.take(index, axis) in flax layout.
  index: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)
  axis: int = 0
  # The orbax layout version (``convert.pretrained``) that introduced ``index``: older
  # orbax directories hold this parameter in mamba_ssm's order.
  since: int = 0


def decode_special_floats(value: Any) -> Any:
  """HF's ``{"__float__": "Infinity"}`` (and -Infinity, NaN) -> float, recursively."""
  if isinstance(value, dict):
    if set(value) == {"__float__"} and isinstance(value["__float__"], str):
      text = value["__float__"]
      if text not in ("Infinity", "-Infinity", "NaN"):
        raise ValueError(f"unknown special float {value!r}")
      return float(text.replace("Infinity", "inf"))
    return {k: decode_special_floats(v) for k, v in value.items()}
  if isinstance(value, list):
    return [decode_special_floats(v) for v in value]
  return value


def read_json(path: Path) -> dict[str, Any]:
  """A config.json as a dict; special floats decoded. FileNotFoundError if missing."""
  if not path.is_file():
    raise FileNotFoundError(f"{path.parent} has no {path.name}: a checkpoint directory needs "
                            f"its {path.name} next to the weights")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
  return decode_special_floats(raw)


def param_names(model: nnx.Module) -> list[ParamName]:
  """The mamba_ssm name and layout of every ``nnx.Param`` of ``model`` (abstract or not)."""
  modules = dict(nnx.iter_modules(model))
  names = []
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    parent, leaf = modules.get(tuple(path[:-1])), path[-1]
    prefix = ".".join(str(p) for p in path[:-1])
    layout, torch_leaf = _PLAIN, str(leaf)
    if isinstance(parent, nnx.Linear) and leaf == "kernel":
      layout, torch_leaf = _LINEAR, "weight"
    elif isinstance(parent, nnx.Embed) and leaf == "embedding":
      torch_leaf = "weight"
    elif isinstance(parent, CausalConv1d) and leaf == "kernel":
      layout, torch_leaf = _CONV, "weight"
    elif leaf == "kernel" or not isinstance(parent, nnx.Module):
      raise ValueError(f"no PyTorch layout is known for {'.'.join(map(str, path))} (held by "
                       f"{type(parent).__name__}); add it to mamba_jax.convert.mamba_ssm_layout")
    index, axis, since = _mixer_order(modules.get(tuple(path[:-2])), path)
    names.append(ParamName(tuple(path), f"{prefix}.{torch_leaf}" if prefix else torch_leaf,
                           layout, index, axis, since))
  return names


# The orbax layout versions (``convert.pretrained``) that introduced each mixer's order.
_MAMBA2_GROUPED_SINCE, _MAMBA1_INTERLEAVED_SINCE = 2, 3


def _mixer_order(owner: Any, path: tuple[Any, ...]
                 ) -> tuple[Optional[np.ndarray], int, int]:
  """(index, axis, since) of a Mamba-2 in_proj / conv1d or a gated Mamba-1 in_proj parameter
  (``ours = theirs.take(index, axis)``, flax layout; ``since`` the orbax layout version that
  introduced it), else (None, 0, 0)."""
  if len(path) < 2:
    return None, 0, 0
  module, leaf = str(path[-2]), str(path[-1])
  if isinstance(owner, Mamba2Mixer):
    in_proj_index, conv_index = owner.mamba_ssm_order()
    if module == "in_proj":
      return in_proj_index, 1 if leaf == "kernel" else 0, _MAMBA2_GROUPED_SINCE
    if module == "conv1d":
      return conv_index, 0, _MAMBA2_GROUPED_SINCE
  if isinstance(owner, Mamba1Mixer) and module == "in_proj":
    in_proj_index = owner.mamba_ssm_order()  # None without the gate (SSMNoGate)
    if in_proj_index is not None:
      return in_proj_index, 1 if leaf == "kernel" else 0, _MAMBA1_INTERLEAVED_SINCE
  return None, 0, 0


def to_mamba_ssm_order(array: np.ndarray, name: ParamName) -> np.ndarray:
  """Our (flax-layout) array -> mamba_ssm's column / channel order (a no-op for most)."""
  if name.index is None:
    return array
  return np.take(array, np.argsort(name.index), axis=name.axis)


def from_mamba_ssm_order(array: np.ndarray, name: ParamName) -> np.ndarray:
  """A flax-layout array in mamba_ssm's order -> ours (the inverse of
  :func:`to_mamba_ssm_order`). An array whose permuted axis has another size is returned
  as it is, for the caller's shape check to report."""
  if name.index is None:
    return array
  if array.ndim <= name.axis or array.shape[name.axis] != name.index.size:
    return array  # the caller's shape check reports it
  return np.take(array, name.index, axis=name.axis)


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
  """Our array -> the PyTorch tensor's layout (a contiguous copy)."""
  if layout == _LINEAR:
    return np.ascontiguousarray(array.T)
  if layout == _CONV:
    return np.ascontiguousarray(array[:, None, :])
  return np.ascontiguousarray(array)


def from_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
  """A PyTorch tensor -> our layout (the inverse of :func:`to_torch_layout`)."""
  if layout == _LINEAR:
    return array.T if array.ndim == 2 else array
  if layout == _CONV:
    return array[:, 0, :] if array.ndim == 3 and array.shape[1] == 1 else array
  return array


def model_state_dict(model: MambaLM) -> dict[str, np.ndarray]:
  """The model's parameters as mamba_ssm's ``state_dict()``: names, layouts, dtypes kept.

  With tied embeddings ``lm_head.weight`` is the embedding's very array (one storage).
  """
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for name in param_names(model):
    array = np.asarray(jax.device_get(state[name.path][...]))
    out[name.torch_name] = to_torch_layout(to_mamba_ssm_order(array, name), name.layout)
  if model.config.tie_embeddings:
    out[LM_HEAD] = out[EMBEDDING]
  return out


def abstract_model(config: MambaConfig, dtype: Any) -> MambaLM:
  """The MambaLM of ``config`` with shapes only (no parameter is initialised)."""
  return nnx.eval_shape(lambda: MambaLM(config, dtype=dtype, param_dtype=dtype,
                                        rngs=nnx.Rngs(0)))


def _describe(keys: list[str], limit: int = 8) -> str:
  shown = ", ".join(sorted(keys)[:limit])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def model_from_state_dict(config: MambaConfig, state_dict: Mapping[str, np.ndarray], *,
                          dtype: Any, source: str) -> MambaLM:
  """Builds a MambaLM of ``config`` holding a mamba_ssm-named state dict's tensors.

  Each tensor is cast to the dtype its parameter has in ``MambaLM(config, dtype=dtype,
  param_dtype=dtype)``. ``source`` names the file in errors.

  Raises:
    ValueError: missing or unexpected tensors, a shape that does not fit the config, or a
      tied ``lm_head.weight`` different from the embedding.
  """
  state_dict = dict(state_dict)
  if config.tie_embeddings and LM_HEAD in state_dict:
    head, embedding = state_dict.pop(LM_HEAD), state_dict.get(EMBEDDING)
    if embedding is None or head.shape != embedding.shape or not np.array_equal(head, embedding):
      raise ValueError(f"{source}: the config ties the embeddings, but {LM_HEAD} differs from "
                       f"{EMBEDDING}; set tie_embeddings=False in the config to keep both")
  abstract = abstract_model(config, dtype)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  other = [path for path, _ in nnx.to_flat_state(rest)]
  if other:
    raise ValueError(f"MambaLM has non-parameter variables {other} that a checkpoint does "
                     "not hold; mamba_jax.convert cannot fill them")
  names = param_names(abstract)
  expected = {n.torch_name for n in names}
  missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
  if missing or unexpected:
    raise ValueError(f"{source} does not fit the config: missing {_describe(missing) or 'none'}; "
                     f"unexpected {_describe(unexpected) or 'none'}")
  abstract_leaves = dict(nnx.to_flat_state(params))
  leaves = []
  for name in names:
    target = abstract_leaves[name.path]
    array = from_mamba_ssm_order(
        from_torch_layout(np.asarray(state_dict[name.torch_name]), name.layout), name)
    if tuple(array.shape) != tuple(target.shape):
      raise ValueError(f"{source}: {name.torch_name} has shape "
                       f"{tuple(state_dict[name.torch_name].shape)}, which does not fit "
                       f"{'.'.join(map(str, name.path))} of shape {tuple(target.shape)} "
                       "(in flax layout) for this config")
    leaves.append((name.path, target.replace(jnp.asarray(array, dtype=target.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


# mamba_ssm's MHA reads attn_cfg with its own defaults: rotary embeddings only when
# rotary_emb_dim > 0, and causal=False unless given. Our Attention picks the encoding with
# ``positions`` (RoPE over the whole head when rotary_emb_dim is 0) and defaults to causal.
# The two functions below translate between them; the keys only we have are dropped on export.
_ATTN_KEYS_ONLY_OURS = ("positions", "max_position", "implementation", "xpos_scale_base",
                        "xpos_gamma")


def attn_cfg_from_mamba_ssm(attn_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """mamba_ssm attn_cfg -> ours, making mamba_ssm's defaults explicit."""
  out = dict(attn_cfg)
  out.setdefault("positions", "rope" if out.get("rotary_emb_dim", 0) > 0 else "none")
  out.setdefault("causal", False)
  return out


def attn_cfg_to_mamba_ssm(attn_cfg: Mapping[str, Any], d_model: int) -> dict[str, Any]:
  """Our attn_cfg -> mamba_ssm's MHA keyword arguments, with the same attention."""
  out = dict(attn_cfg)
  positions = out.get("positions", "rope")
  if positions == "absolute":
    raise ValueError("mamba_ssm's MHA has no absolute position embeddings "
                     "(attn_cfg positions='absolute'); save this model with format='orbax'")
  if positions == "xpos":
    raise ValueError("mamba_ssm's MHA has no xPos positions (attn_cfg positions='xpos'); save "
                     "this model with format='orbax'")
  if positions == "rope":
    if not out.get("rotary_emb_dim"):
      out["rotary_emb_dim"] = out.get("head_dim") or d_model // out["num_heads"]
  else:
    out["rotary_emb_dim"] = 0
  out.setdefault("causal", True)
  for key in _ATTN_KEYS_ONLY_OURS:
    out.pop(key, None)
  return out


def config_from_mamba_ssm(raw: Mapping[str, Any]) -> MambaConfig:
  """mamba_ssm's config.json dict -> MambaConfig (ValueError naming a bad key)."""
  raw = dict(raw)
  if raw.get("attn_layer_idx"):
    raw["attn_cfg"] = attn_cfg_from_mamba_ssm(raw.get("attn_cfg") or {})
  return MambaConfig.from_dict(raw)


def load_mamba_ssm(directory: Path, *, dtype: Any = jnp.float32) -> MambaLM:
  """Reads mamba_ssm's format: ``config.json`` + ``pytorch_model.bin``."""
  config = config_from_mamba_ssm(read_json(directory / CONFIG_NAME))
  weights = directory / TORCH_WEIGHTS_NAME
  if not weights.is_file():
    raise FileNotFoundError(f"{directory} has a mamba_ssm config.json but no "
                            f"{TORCH_WEIGHTS_NAME} (the weights of mamba_ssm's format)")
  return model_from_state_dict(config, load_torch_state_dict(weights), dtype=dtype,
                               source=str(weights))


def mamba_ssm_config_json(config: MambaConfig, *, mamba_ssm_attention: bool = True) -> str:
  """config.json text as mamba_ssm writes it (Python json: an infinite bound is Infinity).

  ``mamba_ssm_attention``: rewrite attn_cfg in mamba_ssm's MHA terms (for mamba_ssm's format);
  False keeps our own keys (for the orbax format, read back by mamba_jax only).
  """
  data = config.to_dict()
  if mamba_ssm_attention and data.get("attn_layer_idx"):
    data["attn_cfg"] = attn_cfg_to_mamba_ssm(data.get("attn_cfg") or {}, config.d_model)
  if "norm_epsilon" in data:
    logging.warning("config.json gets norm_epsilon=%s, a mamba_jax key that mamba_ssm's own "
                    "MambaConfig does not accept (mamba_ssm always uses 1e-5)",
                    data["norm_epsilon"])
  for bound in data.get("ssm_cfg", {}).get("dt_limit", ()):
    if isinstance(bound, float) and math.isnan(bound):
      raise ValueError("ssm_cfg.dt_limit has a NaN bound")
  return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save_mamba_ssm(model: MambaLM, directory: Path) -> None:
  """Writes mamba_ssm's format: ``config.json`` + ``pytorch_model.bin`` (no torch needed)."""
  directory.mkdir(parents=True, exist_ok=True)
  write_torch_zip(directory / TORCH_WEIGHTS_NAME, model_state_dict(model))
  (directory / CONFIG_NAME).write_text(mamba_ssm_config_json(model.config))
