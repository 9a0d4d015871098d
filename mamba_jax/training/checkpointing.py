"""Checkpoints of a training run: orbax ``CheckpointManager`` with three items per step.

  state   the train state pytree (params, optimizer state, step, counters), float32 as held
  data    the data iterator's state (``grain`` ``DatasetIterator.get_state()``), JSON
  config  the run's config, JSON (for reading a checkpoint without its command line)

Sharded arrays are saved as they are (each process writes the shards it holds; replicated
shards once). A restore places every array with the sharding of its ``jax.ShapeDtypeStruct``
in the target tree, so a checkpoint saved on one device mesh restores onto another (other
sizes, other axes split): orbax reads each device's slice of the saved global array.

With several processes, orbax writes the arrays from every process and the JSON items from
the primary one; the data state is the same on all processes (each has read as many of its
batches), so every process restores it.

Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when done, so a run killed mid-save leaves the
previous checkpoint as the latest one. ``max_to_keep`` bounds the directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import ml_collections
import orbax.checkpoint as ocp

from mamba_jax.config import MambaConfig


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON types."""
  return json.loads(config.to_json_best_effort())


# The parameter layout of the saved state. 2: Mamba-2's in_proj columns and conv channels are
# stored group by group (mamba_jax/nn/mamba2.py); before it (no marker), in mamba_ssm's order,
# which differs only when ngroups > 1. 3: the gated Mamba-1 in_proj's x and z columns are
# interleaved per channel (mamba_jax/nn/mamba1.py); before it, [x | z] as mamba_ssm's.
PARAM_LAYOUT_VERSION = 3
_LAYOUT_KEY = "_param_layout_version"


def _has_grouped_mamba2(tree: Any) -> bool:
  """Whether a saved config (plain JSON) names a Mamba-2 layer with ngroups > 1."""
  if isinstance(tree, dict):
    groups = tree.get("ngroups")
    if isinstance(groups, int) and groups > 1:
      return True
    return any(_has_grouped_mamba2(v) for v in tree.values())
  if isinstance(tree, list):
    return any(_has_grouped_mamba2(v) for v in tree)
  return False


def _has_gated_mamba1(saved_config: dict[str, Any]) -> bool:
  """Whether a saved run config (plain JSON) has a gated Mamba-1 layer: its ``model``
  fields' ``ssm_cfg["layer"]`` is "Mamba1" (mamba_ssm's default when absent) and some layer
  is not in ``attn_layer_idx``."""
  model = saved_config.get("model")
  if not isinstance(model, dict):
    return False
  ssm_cfg = model.get("ssm_cfg") or {}
  if not isinstance(ssm_cfg, dict) or ssm_cfg.get("layer", "Mamba1") != "Mamba1":
    return False
  n_layer = model.get("n_layer", MambaConfig.n_layer)
  attention = set(model.get("attn_layer_idx") or ())
  return not isinstance(n_layer, int) or any(i not in attention for i in range(n_layer))


class Checkpointer:
  """Saves and restores (state, data iterator state, config) under ``directory``."""

  def __init__(self, directory: str | epath.Path, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = epath.Path(os.path.abspath(directory))  # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any],
           config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
    """Starts saving at ``step`` if the interval says so (or ``force``); True if it did."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave({**config_to_json_dict(config),
                                  _LAYOUT_KEY: PARAM_LAYOUT_VERSION})), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, data iterator state) of ``step``; ``abstract_state`` gives structure and dtypes.

    ``abstract_state`` is a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``s);
    the restored arrays take its leaves' shardings (e.g. ``jax.ShapeDtypeStruct(shape, dtype,
    sharding=NamedSharding(mesh, spec))`` for the current mesh, which need not be the mesh the
    checkpoint was saved from).
    """
    saved_config = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    version = saved_config.get(_LAYOUT_KEY, 1)
    changed = []
    if version < 2 and _has_grouped_mamba2(saved_config):
      changed.append("Mamba-2 layers with ngroups > 1 store their in_proj columns and conv "
                     "channels group by group since layout 2")
    if version < 3 and _has_gated_mamba1(saved_config):
      changed.append("gated Mamba-1 layers store their in_proj x and z columns interleaved "
                     "per channel since layout 3")
    if version > PARAM_LAYOUT_VERSION:
      changed.append("it was written by a newer mamba_jax")
    if changed:
      raise ValueError(
          f"checkpoint step {step} in {self.directory} has parameter layout version {version}, "
          f"this code reads {PARAM_LAYOUT_VERSION}: {'; '.join(changed)}, so restoring would "
          "silently permute parameters. Restore it with the mamba_jax version that wrote it "
          "and re-save it with mamba_jax.convert.save_pretrained(format='mamba_ssm'), which "
          "this version loads, or start a new workdir.")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored["state"], restored["data"]

  def restore_config(self, step: int) -> dict[str, Any]:
    """The config saved with ``step``, as a plain dict."""
    saved = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    saved.pop(_LAYOUT_KEY, None)
    return saved

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
