"""Placing model state, optimizer state and batches on a mesh; shardings for ``jax.jit``.

Every array leaf of a tree (``nnx.state(model)``, a train state
``{"params", "opt_state", ...}``, an abstract tree of ``jax.ShapeDtypeStruct``) gets its
PartitionSpec from the logical axes of its path (:mod:`mamba_jax.sharding.logical`) and a
rules table (:mod:`mamba_jax.sharding.rules`). Optimizer moments mirror the parameter paths
(``opt_state/0/mu/backbone/...``), so they are sharded like their parameters; scalars
(step counters) are replicated.

Typical use (one or many processes)::

  mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  validate_mesh(mesh, config, batch=b, length=l)
  state = sharded_init(lambda: init_train_state(params_fn(), tx), config, mesh)
  step = jax.jit(step_fn, in_shardings=(tree_shardings(state, config, mesh),
                                        batch_sharding(mesh)), ...)

Letter legend: b batch, l length.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mamba_jax.config import MambaConfig
from mamba_jax.sharding import logical as lg
from mamba_jax.sharding.rules import Rules, rules_for_mesh


def partition_specs(tree: Any, config: MambaConfig, mesh: Mesh,
                    rules: Optional[Rules] = None) -> Any:
  """A tree like ``tree`` with a PartitionSpec per array leaf.

  Raises:
    ValueError: a parameter the logical table does not cover, or a dimension that its mesh
      axes do not divide (naming the parameter path).
  """
  rules = rules_for_mesh(mesh) if rules is None else rules

  def spec(path, leaf) -> PartitionSpec:
    name = lg.path_string(path)
    axes = lg.param_logical_axes(name, len(leaf.shape), config)
    return lg.to_spec(axes, rules, leaf.shape, mesh, what=f"parameter {name!r}")

  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, config: MambaConfig, mesh: Mesh,
                   rules: Optional[Rules] = None) -> Any:
  """A tree like ``tree`` of NamedShardings (for ``jax.jit`` in/out_shardings)."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      partition_specs(tree, config, mesh, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard(tree: Any, config: MambaConfig, mesh: Mesh, rules: Optional[Rules] = None) -> Any:
  """``tree`` placed on the mesh (``jax.device_put``; one process, or the same values on
  every process). For trees too big for one device use :func:`sharded_init`."""
  return jax.device_put(tree, tree_shardings(tree, config, mesh, rules))


def sharded_init(init_fn: Callable[[], Any], config: MambaConfig, mesh: Mesh,
                 rules: Optional[Rules] = None) -> Any:
  """``init_fn()`` computed directly in its sharded layout: each device materialises only its
  shards (``jax.jit`` with out_shardings from the abstract tree). Works across processes."""
  abstract = jax.eval_shape(init_fn)
  return jax.jit(init_fn, out_shardings=tree_shardings(abstract, config, mesh, rules))()


def shard_model(model: nnx.Module, mesh: Mesh, rules: Optional[Rules] = None) -> nnx.Module:
  """Moves every variable of a MambaLM onto the mesh, in place; returns the model."""
  state = nnx.state(model)
  nnx.update(model, shard(state, model.config, mesh, rules))
  return model


def abstract_tree(tree: Any, config: MambaConfig, mesh: Mesh,
                  rules: Optional[Rules] = None) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying their sharding: the target of an orbax restore
  onto ``mesh`` (whatever mesh the checkpoint was saved from)."""
  shardings = tree_shardings(tree, config, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def batch_spec(mesh: Mesh, rules: Optional[Rules] = None) -> PartitionSpec:
  """PartitionSpec of (b, l) token arrays: batch over the batch axes, length over
  ``sequence`` when sequence-parallel."""
  rules = rules_for_mesh(mesh) if rules is None else rules
  return lg.to_spec((lg.ACT_BATCH, lg.ACT_LENGTH), rules)


def batch_sharding(mesh: Mesh, rules: Optional[Rules] = None) -> NamedSharding:
  """NamedSharding of (b, l) token arrays (see :func:`batch_spec`)."""
  return NamedSharding(mesh, batch_spec(mesh, rules))
