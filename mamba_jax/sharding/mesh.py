"""The device mesh: axes ``data``, ``fsdp``, ``tensor``, ``sequence``, and its validation.

A :class:`MeshConfig` gives one size per axis; one size may be −1, "the rest of the devices".
:func:`make_mesh` builds a ``jax.sharding.Mesh`` of ``Auto`` axes (XLA's SPMD partitioner
places the collectives of jit-compiled code; ``shard_map`` regions are explicit) over all
devices of all processes, so the same call works on one CPU, one GPU host or a TPU pod slice
after ``jax.distributed.initialize()``.

What each axis shards (see :mod:`mamba_jax.sharding.rules`):

  data      the batch; parameters replicated (gradients all-reduced).
  fsdp      the batch too, and the parameters / optimizer state along their d_model axis
            (all-gathered before use, gradients reduce-scattered).
  tensor    heads / d_inner of the mixers, the MLP hidden axis, the vocabulary.
  sequence  the length: SSM states passed between devices (sequence_parallel.py).

:func:`validate_mesh` checks a mesh against a model and a batch shape before anything is
compiled and raises ``ValueError`` naming the size that does not divide and why.

Letter legend: b batch, l length, h heads, g groups, e d_inner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

from mamba_jax.config import ATTENTION, MambaConfig

AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; exactly one may be −1 (all remaining devices).

  The product of the sizes must equal the number of devices used (all devices by default).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def __post_init__(self):
    sizes = self.sizes
    for name, size in zip(AXES, sizes):
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"MeshConfig.{name} must be a positive int or -1 (the rest), "
                         f"got {size!r}")
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1 (the rest), got "
                       f"{dict(zip(AXES, sizes))}")

  @property
  def sizes(self) -> tuple[int, ...]:
    return (self.data, self.fsdp, self.tensor, self.sequence)

  def resolve(self, num_devices: int) -> tuple[int, ...]:
    """The four sizes with −1 replaced, checked to multiply to ``num_devices``."""
    sizes = list(self.sizes)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by the "
            f"product {fixed} of the fixed axis sizes, so the -1 axis has no integer size")
      sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} has {fixed} devices but "
                       f"{num_devices} are available; use -1 for one axis to take the rest")
    return tuple(sizes)

  @classmethod
  def from_string(cls, text: str) -> "MeshConfig":
    """From a flag value such as ``"data=2,tensor=2,sequence=-1"`` (unnamed axes: 1)."""
    sizes: dict[str, int] = {"data": 1}
    for item in filter(None, (part.strip() for part in text.split(","))):
      name, _, value = item.partition("=")
      name = name.strip()
      if name not in AXES or not value.strip().lstrip("-").isdigit():
        raise ValueError(f"mesh flag item {item!r} must be <axis>=<int> with axis one of "
                         f"{AXES}")
      sizes[name] = int(value)
    return cls(**sizes)


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh of axes (data, fsdp, tensor, sequence) over ``devices`` (default: all).

  ``jax.make_mesh`` orders the devices for the physical topology (ICI rings on TPU) with the
  last axes the most local: ``sequence`` and ``tensor``, the chattiest, are innermost.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.resolve(len(devices))
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def axis_size(mesh: Mesh, name: str) -> int:
  """The size of mesh axis ``name``; 1 when the mesh has no such axis."""
  return int(mesh.shape[name]) if name in mesh.shape else 1


def batch_size_of(mesh: Mesh) -> int:
  """How many ways the batch is split: data × fsdp."""
  return axis_size(mesh, "data") * axis_size(mesh, "fsdp")


def _require(value: int, what: str, divisor: int, divisor_name: str, why: str) -> None:
  if value % divisor:
    raise ValueError(f"{what} = {value} is not divisible by {divisor_name} = {divisor}: {why}")


def validate_mesh(mesh: Mesh, config: MambaConfig, *, batch: Optional[int] = None,
                  length: Optional[int] = None) -> None:
  """Raises ValueError when the mesh cannot shard this model / batch shape.

  Checks: data·fsdp divides the batch; sequence divides the length and leaves every device
  at least d_conv − 1 tokens (the conv's halo comes from the left neighbour only); tensor
  divides every mixer's heads and groups (Mamba-2: ngroups % tensor == 0, so that the heads
  of a group and the group's B, C sit on one device), d_inner (Mamba-1), attention heads,
  the MLP width and the padded vocabulary. Sequence parallelism needs SSM layers only
  (attention layers would need the whole sequence's keys).
  """
  for name in AXES:
    if name not in mesh.shape:
      raise ValueError(f"mesh has axes {tuple(mesh.shape)}; expected {AXES} (make_mesh)")
  tensor, sequence = axis_size(mesh, "tensor"), axis_size(mesh, "sequence")
  if batch is not None:
    _require(batch, "batch", batch_size_of(mesh), "data·fsdp",
             "each data-parallel replica takes an equal slice of the batch")
  if length is not None:
    _require(length, "length", sequence, "mesh axis 'sequence'",
             "each device takes an equal slice of the sequence")
  kinds = set(config.layer_kinds)
  kw = config.ssm_kwargs
  if sequence > 1:
    if ATTENTION in kinds:
      raise ValueError(f"sequence = {sequence} > 1 needs SSM layers only: attention layers "
                       f"{config.attn_layer_idx} would need every device's keys and values")
    if config.ssm_layer == "H3":
      raise ValueError("sequence parallelism is implemented for Mamba1 / Mamba2 / SSMNoGate "
                       "mixers, not H3")
    d_conv = kw.get("d_conv", 4)
    if length is not None and length // sequence < d_conv - 1:
      raise ValueError(
          f"length / sequence = {length} / {sequence} = {length // sequence} tokens per "
          f"device is fewer than d_conv - 1 = {d_conv - 1}: the causal conv takes its "
          "history from the left neighbour only")
  if tensor > 1:
    _require(config.vocab_size_padded, "vocab_size_padded", tensor, "mesh axis 'tensor'",
             "the embedding and logits are split over the vocabulary")
    if config.d_intermediate:
      _require(config.d_intermediate, "d_intermediate (MLP width)", tensor,
               "mesh axis 'tensor'", "fc1 columns / fc2 rows are split over devices")
    if config.ssm_layer == "Mamba2" and kinds - {ATTENTION}:
      d_inner = kw.get("expand", 2) * config.d_model
      d_ssm = kw.get("d_ssm") or d_inner
      if d_ssm != d_inner:
        raise ValueError(f"tensor = {tensor} > 1 needs d_ssm == d_inner (got d_ssm = {d_ssm}, "
                         f"d_inner = {d_inner}): the gated-MLP side branch is not split")
      nheads = d_ssm // kw.get("headdim", 64)
      ngroups = kw.get("ngroups", 1)
      _require(nheads, "Mamba-2 nheads", tensor, "mesh axis 'tensor'",
               "heads are split over the tensor axis")
      _require(ngroups, "Mamba-2 ngroups", tensor, "mesh axis 'tensor'",
               "each device must hold whole groups of B, C and of the gated norm with the "
               "heads that read them (Mamba-2 §8)")
    if config.ssm_layer in ("Mamba1", "SSMNoGate", "H3") and kinds - {ATTENTION}:
      d_inner = int(kw.get("expand", 2 if config.ssm_layer != "H3" else 1) * config.d_model)
      _require(d_inner, f"{config.ssm_layer} d_inner", tensor, "mesh axis 'tensor'",
               "channels are split over the tensor axis")
    if ATTENTION in kinds:
      heads = config.attn_cfg["num_heads"]
      kv_heads = config.attn_cfg.get("num_heads_kv") or heads
      _require(heads, "attention num_heads", tensor, "mesh axis 'tensor'",
               "query heads are split over the tensor axis")
      _require(kv_heads, "attention num_heads_kv", tensor, "mesh axis 'tensor'",
               "key/value heads are split with their query heads")
