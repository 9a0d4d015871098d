"""``load_pretrained`` / ``save_pretrained``: a ``MambaLM`` from or to a local directory.

Three directory formats, told apart by their files (all offline; nothing is downloaded):

  "hf"         config.json with HF keys (model_type "mamba" / "mamba2", MambaForCausalLM /
               Mamba2ForCausalLM) + model.safetensors (or its sharded index, or an older
               pytorch_model.bin)                       :mod:`mamba_jax.convert.hf_layout`
  "mamba_ssm"  config.json of mamba_ssm's MambaConfig + pytorch_model.bin
                                                        :mod:`mamba_jax.convert.mamba_ssm_layout`
  "orbax"      config.json (``MambaConfig.to_dict()``) + params/, the ``nnx.Param`` state
               saved by orbax-checkpoint's StandardCheckpointer, + layout.json
               ({"layout_version": 3}): the parameters as the modules hold them

Orbax layout versions. Version 2 stores Mamba-2's in_proj columns and conv channels group
by group (``mamba_jax.nn.mamba2``'s grouped layout); version 3 moreover stores the gated
Mamba-1 in_proj's x and z columns interleaved per channel (``mamba_jax.nn.mamba1``'s
layout). Directories written before (no layout.json: version 1; or version 2) hold the
parameters a later version changed in mamba_ssm's order with the same shapes, and are
permuted on loading (with a warning), never read as they are. A newer version raises.

Saving and loading again gives bitwise the same parameters in every format. The model is
built with ``dtype`` as its compute and parameter dtype, and each checkpoint tensor is cast
to the dtype its parameter has there (the modules keep some, e.g. Mamba-1's A_log, in
float32).

Example::

  model = load_pretrained("/ckpt/mamba-130m-hf")            # an HF snapshot directory
  logits = model(input_ids)                                  # (b, l, v_pad) float32
  save_pretrained(model, "/ckpt/mamba-130m", format="mamba_ssm")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.convert.hf_layout import (SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME,
                                         config_from_hf, load_hf, save_hf)
from mamba_jax.convert.mamba_ssm_layout import (CONFIG_NAME, TORCH_WEIGHTS_NAME, abstract_model,
                                                config_from_mamba_ssm, load_mamba_ssm,
                                                mamba_ssm_config_json, param_names,
                                                read_json, save_mamba_ssm)
from mamba_jax.nn.lm import MambaLM

FORMATS = ("hf", "mamba_ssm", "orbax")
ORBAX_PARAMS_NAME = "params"
ORBAX_LAYOUT_NAME = "layout.json"
# 1: (no layout.json) Mamba-2 in_proj / conv and Mamba-1 in_proj in mamba_ssm's order;
# 2: Mamba-2 grouped by group; 3: and gated Mamba-1's in_proj interleaved [x_c, z_c].
ORBAX_LAYOUT_VERSION = 3
# The weight files of each format, to refuse mixing two formats in one directory.
_WEIGHT_FILES = {"hf": (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME),
                 "mamba_ssm": (TORCH_WEIGHTS_NAME,), "orbax": (ORBAX_PARAMS_NAME,)}


def _is_hf_config(raw: dict[str, Any]) -> bool:
  return "model_type" in raw or "architectures" in raw


def detect_format(local_dir: str | Path) -> str:
  """"hf", "mamba_ssm" or "orbax" for a checkpoint directory (see the module docstring).

  Raises:
    FileNotFoundError: not a directory, no config.json, or no weights for its config.
    ValueError: a config.json that is neither HF's nor mamba_ssm's.
  """
  directory = Path(local_dir)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory; load_pretrained reads a local "
                            "checkpoint directory (config.json + weights)")
  raw = read_json(directory / CONFIG_NAME)
  if _is_hf_config(raw):
    return "hf"
  if "d_model" not in raw:
    raise ValueError(f"{directory / CONFIG_NAME} is neither an HF config (model_type, "
                     "architectures) nor a mamba_ssm config (d_model, n_layer, ssm_cfg, ...)")
  if (directory / ORBAX_PARAMS_NAME).is_dir():
    return "orbax"
  if (directory / TORCH_WEIGHTS_NAME).is_file():
    return "mamba_ssm"
  raise FileNotFoundError(f"{directory} has a mamba_ssm-style config.json but no weights: "
                          f"expected {TORCH_WEIGHTS_NAME} (mamba_ssm) or {ORBAX_PARAMS_NAME}/ "
                          "(orbax)")


def orbax_layout_version(directory: str | Path) -> int:
  """The parameter layout version of an orbax-format directory (1 without layout.json)."""
  path = Path(directory) / ORBAX_LAYOUT_NAME
  if not path.is_file():
    return 1
  version = read_json(path).get("layout_version")
  if not isinstance(version, int) or version < 1:
    raise ValueError(f"{path}: layout_version must be a positive integer, got {version!r}")
  return version


def _load_orbax(directory: Path, dtype: Any) -> MambaLM:
  config = MambaConfig.from_dict(read_json(directory / CONFIG_NAME))
  version = orbax_layout_version(directory)
  if version > ORBAX_LAYOUT_VERSION:
    raise ValueError(f"{directory} has parameter layout_version {version}, newer than this "
                     f"mamba_jax's {ORBAX_LAYOUT_VERSION}; load it with a newer mamba_jax")
  abstract = abstract_model(config, dtype)
  graphdef, target = nnx.split(abstract, nnx.Param)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore((directory / ORBAX_PARAMS_NAME).absolute(), target)
  model = nnx.merge(graphdef, params)
  # Parameters whose order changed after ``version`` are in mamba_ssm's order there.
  permuted = [name for name in param_names(abstract)
              if name.index is not None and name.since > version]
  if permuted:
    logging.warning("%s: orbax layout version %d (written before Mamba-2's grouped in_proj / "
                    "conv layout (2) or the gated Mamba-1's interleaved in_proj (3)); "
                    "permuting %d parameters to layout version %d. save_pretrained writes "
                    "the new layout.", directory, version, len(permuted),
                    ORBAX_LAYOUT_VERSION)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name in permuted:
      variable = state[name.path]
      variable[...] = jnp.take(variable[...], jnp.asarray(name.index), axis=name.axis)
  return model


def _save_orbax(model: MambaLM, directory: Path) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save((directory / ORBAX_PARAMS_NAME).absolute(), nnx.state(model, nnx.Param),
                      force=True)
    checkpointer.wait_until_finished()
  (directory / CONFIG_NAME).write_text(
      mamba_ssm_config_json(model.config, mamba_ssm_attention=False))
  (directory / ORBAX_LAYOUT_NAME).write_text(
      json.dumps({"layout_version": ORBAX_LAYOUT_VERSION}) + "\n")


def load_pretrained(local_dir: str | Path, *, dtype: Any = jnp.float32) -> MambaLM:
  """A MambaLM from a local checkpoint directory in any of :data:`FORMATS`.

  Args:
    local_dir: the directory (an HF snapshot, a mamba_ssm checkpoint, or ours).
    dtype: compute and parameter dtype of the model (parameters the modules keep in
      float32 stay float32).

  Raises:
    FileNotFoundError: the directory, its config.json or its weights are missing.
    ValueError: an unsupported architecture or config, or weights that do not fit it.
  """
  directory = Path(local_dir)
  kind = detect_format(directory)
  if kind == "hf":
    return load_hf(directory, read_json(directory / CONFIG_NAME), dtype=dtype)
  if kind == "orbax":
    return _load_orbax(directory, dtype)
  return load_mamba_ssm(directory, dtype=dtype)


def save_pretrained(model: MambaLM, local_dir: str | Path, *,
                    format: str = "hf") -> Path:  # pylint: disable=redefined-builtin
  """Writes ``model`` to ``local_dir`` (created if needed) in ``format``; returns the path.

  "hf": config.json + model.safetensors, loadable by transformers' from_pretrained (Mamba
  and Mamba-2 models only: ValueError naming what HF cannot express otherwise).
  "mamba_ssm": config.json + pytorch_model.bin (written without torch; torch.load reads it).
  "orbax": config.json + params/ (orbax StandardCheckpointer).

  Raises:
    ValueError: an unknown format, a model HF cannot express, or a directory already
      holding the weights of another format.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r} is not one of {FORMATS}")
  if not isinstance(model, MambaLM):
    raise ValueError(f"save_pretrained takes a MambaLM, got {type(model).__name__}")
  directory = Path(local_dir)
  others = [name for kind, names in _WEIGHT_FILES.items() if kind != format for name in names
            if (directory / name).exists()]
  if others:
    raise ValueError(f"{directory} already holds {others} of another format; save "
                     f"format={format!r} into an empty directory")
  if format == "hf":
    save_hf(model, directory)
  elif format == "mamba_ssm":
    save_mamba_ssm(model, directory)
  else:
    _save_orbax(model, directory)
  return directory


def read_config(local_dir: str | Path) -> MambaConfig:
  """The MambaConfig of a checkpoint directory, without reading its weights."""
  directory = Path(local_dir)
  kind = detect_format(directory)
  raw = read_json(directory / CONFIG_NAME)
  if kind == "hf":
    return config_from_hf(raw, str(directory / CONFIG_NAME))
  if kind == "mamba_ssm":
    return config_from_mamba_ssm(raw)
  return MambaConfig.from_dict(raw)
