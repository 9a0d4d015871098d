"""Converts a local checkpoint directory between the HF, mamba_ssm and orbax formats.

Reads any format ``mamba_jax.convert.load_pretrained`` reads (HF MambaForCausalLM /
Mamba2ForCausalLM: config.json + model.safetensors; mamba_ssm: config.json +
pytorch_model.bin; orbax: config.json + params/) and writes ``--to``:

  python scripts/convert_checkpoint.py --input=/ckpt/mamba-130m-hf --output=/ckpt/mamba-130m \
      --to=mamba_ssm [--dtype=float32]

Other files of the input directory (tokenizer files, generation_config.json, README) are
copied alongside. From HF to HF the special-token ids of config.json (pad/bos/eos) are kept.
Everything runs offline on local files; torch is not needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

from mamba_jax.convert import FORMATS, detect_format, load_pretrained, save_pretrained

_INPUT = flags.DEFINE_string("input", None, "checkpoint directory to read", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "directory to write (created)", required=True)
_TO = flags.DEFINE_enum("to", None, list(FORMATS), "format to write", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "parameter dtype of the written checkpoint (parameters the "
                           "modules keep in float32 stay float32)")

# Files that belong to a checkpoint format rather than travelling with it.
_FORMAT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "params")
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _copy_extra_files(source: Path, target: Path) -> list[str]:
  copied = []
  for path in sorted(source.iterdir()):
    if path.name in _FORMAT_FILES or not path.is_file() or path.name.endswith(".safetensors"):
      continue
    shutil.copy2(path, target / path.name)
    copied.append(path.name)
  return copied


def _keep_token_ids(source: Path, target: Path) -> None:
  """Carries HF's special-token ids over (they do not change the model, so MambaConfig
  does not hold them)."""
  raw = json.loads((source / "config.json").read_text())
  tokens = {k: raw[k] for k in _TOKEN_KEYS if k in raw}
  if tokens:
    written = json.loads((target / "config.json").read_text())
    written.update(tokens)
    (target / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  source, target = Path(_INPUT.value), Path(_OUTPUT.value)
  if source.resolve() == target.resolve():
    raise app.UsageError("--output must differ from --input")
  source_format = detect_format(source)
  model = load_pretrained(source, dtype=getattr(jnp, _DTYPE.value))
  save_pretrained(model, target, format=_TO.value)
  if source_format == "hf" and _TO.value == "hf":
    _keep_token_ids(source, target)
  copied = _copy_extra_files(source, target)
  n_params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("%s (%s) -> %s (%s): %d parameters, config %s; copied %s", source,
               source_format, target, _TO.value, n_params, json.dumps(model.config.to_dict()),
               copied or "nothing else")


if __name__ == "__main__":
  app.run(main)
