"""Rules tables: logical axis name -> mesh axis, one per strategy, and their combinations.

A rules table maps the logical names of :mod:`mamba_jax.sharding.logical` to a mesh axis
(``"tensor"``), several (``("data", "fsdp")``: split over their product) or nothing
(absent: replicated). Each base strategy names only what it splits:

  dp    the batch of activations over ``data``. Parameters replicated; XLA all-reduces the
        gradients (one all-reduce of the parameter size per step).
  fsdp  the batch over ``fsdp`` and every weight's d_model axis over ``fsdp`` (ZeRO-3):
        weights all-gathered before each use, gradients reduce-scattered; the optimizer
        state is sharded like the parameters.
  tp    Mamba-2 §8: heads / groups / d_inner / MLP width / vocabulary over ``tensor``,
        Mamba-2's grouped in_proj columns and conv channels and the gated Mamba-1's
        interleaved in_proj columns (column-parallel: each device stores the columns of its
        own groups / channels, see logical.py). The fused H3 in_proj, fc1 and attention's
        qkv stay whole on every tensor device; out_proj / fc2 are row-parallel: one
        all-reduce of (b, l, d) per mixer and per MLP. Mamba-1's x_proj is row-parallel
        too: one more all-reduce, of (b, l, r + 2n), for Δ, B, C.
  sp    the length of activations over ``sequence``; SSM states and conv halos are passed
        between devices by :mod:`mamba_jax.sharding.sequence_parallel`.

Combinations merge the base tables (they name disjoint logical axes, except the batch,
which goes over ``("data", "fsdp")``). :func:`rules_for_mesh` merges the tables of the mesh
axes larger than one.
"""

from __future__ import annotations

from typing import Any, Mapping

from jax.sharding import Mesh

from mamba_jax.sharding import logical as lg
from mamba_jax.sharding.mesh import axis_size

Rules = Mapping[str, Any]

DP: Rules = {lg.ACT_BATCH: "data"}

FSDP: Rules = {lg.ACT_BATCH: "fsdp", lg.EMBED: "fsdp"}

TP: Rules = {
    lg.VOCAB: "tensor", lg.HEADS: "tensor", lg.GROUPS: "tensor", lg.INNER: "tensor", lg.MLP: "tensor",
    lg.ATTN_OUT_IN: "tensor", lg.IN_PROJ_GROUPED: "tensor", lg.CONV_GROUPED: "tensor",
    lg.IN_PROJ_INTERLEAVED: "tensor",
    lg.ACT_HEADS: "tensor", lg.ACT_GROUPS: "tensor", lg.ACT_INNER: "tensor",
    lg.ACT_MLP: "tensor", lg.ACT_VOCAB: "tensor",
}

SP: Rules = {lg.ACT_LENGTH: "sequence"}

BASE: Mapping[str, Rules] = {"dp": DP, "fsdp": FSDP, "tp": TP, "sp": SP}


def combine(*tables: Rules) -> dict[str, Any]:
  """Merges rules tables; a logical axis named by several becomes their tuple of mesh axes
  (in argument order), e.g. the batch over ("data", "fsdp")."""
  merged: dict[str, tuple[str, ...]] = {}
  for table in tables:
    for name, target in table.items():
      if name not in lg.LOGICAL_AXES:
        raise ValueError(f"rules: unknown logical axis {name!r}")
      axes = (target,) if isinstance(target, str) else tuple(target)
      merged[name] = merged.get(name, ()) + tuple(a for a in axes
                                                   if a not in merged.get(name, ()))
  return {name: axes[0] if len(axes) == 1 else axes for name, axes in merged.items()}


STRATEGIES: Mapping[str, Rules] = {
    "replicated": {},
    "dp": DP,
    "fsdp": FSDP,
    "tp": TP,
    "sp": SP,
    "dp_fsdp": combine(DP, FSDP),
    "dp_tp": combine(DP, TP),
    "fsdp_tp": combine(FSDP, TP),
    "dp_sp": combine(DP, SP),
    "tp_sp": combine(TP, SP),
    "dp_tp_sp": combine(DP, TP, SP),
    "all": combine(DP, FSDP, TP, SP),
}

_AXIS_TABLES = (("data", DP), ("fsdp", FSDP), ("tensor", TP), ("sequence", SP))


def rules_for(strategy: str) -> Rules:
  """The named table of :data:`STRATEGIES`."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of "
                     f"{tuple(STRATEGIES)}")
  return STRATEGIES[strategy]


def rules_for_mesh(mesh: Mesh) -> Rules:
  """The merge of the base tables of the mesh axes of size > 1 (all replicated on one
  device). The batch always goes over every batch axis present, in (data, fsdp) order."""
  return combine(*(table for axis, table in _AXIS_TABLES if axis_size(mesh, axis) > 1))
