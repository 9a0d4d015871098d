"""Tensor- and sequence-parallel forwards of the Mamba-2 and Mamba-1 mixers, by composition.

The mixers (``mamba_jax.nn``) call the ops directly and take no distributed arguments. This
file runs the same computation from a mixer's own parameters and helpers, with

* Mamba-2's in_proj column-parallel (§8: the z, x, B, C, dt of a head on one device):
  its columns and the conv's channels are stored group by group (``nn.mamba2``'s grouped
  layout) and sharded over ``tensor`` (logical.py), so each device's matmul gives its own
  groups' parts, with no communication and 1/tensor of the weights per device;
* Mamba-1's in_proj column-parallel too: the gated one's x and z columns are stored
  interleaved per channel (``nn.mamba1``'s layout) and sharded over ``tensor``, so each
  device's matmul gives the x and z of its own channels; SSMNoGate's in_proj is x alone;
* the conv, the SSD / selective scan as ``shard_map`` ops of
  :mod:`mamba_jax.sharding.sequence_parallel` over (batch, ``sequence``, ``tensor``);
* the gated norm group-local (ngroups % tensor == 0) and out_proj row-parallel: one
  all-reduce of (b, l, d) over ``tensor`` per mixer. Mamba-1's x_proj is row-parallel too:
  one more all-reduce, of (b, l, r + 2n), for Δ, B, C.

:func:`parallelize` swaps the SSM mixers of a MambaLM for :class:`ParallelMixer` wrappers, on
a model merged inside the traced function (``nnx.merge(graphdef, state)``), so gradients
are taken with respect to the usual parameter state. A hook in the mixers (see
docs/sharding.md) would make the wrappers unnecessary.

Letter legend: b batch, l length, d d_model, e d_inner, s d_ssm, h heads, p head_dim,
n d_state, g groups, m d_inner − d_ssm, r dt_rank.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
from flax import nnx
from jax.sharding import Mesh

from mamba_jax.nn.attention import Attention
from mamba_jax.nn.mamba1 import Mamba1Mixer
from mamba_jax.nn.mamba2 import Mamba2Mixer
from mamba_jax.ops.checks import check_choice
from mamba_jax.ops.ssd import ssd
from mamba_jax.sharding import logical as lg
from mamba_jax.sharding.mesh import axis_size
from mamba_jax.sharding.rules import Rules, rules_for_mesh
from mamba_jax.sharding.sequence_parallel import (causal_conv1d_sequence_parallel,
                                                  selective_scan_sequence_parallel,
                                                  ssd_sequence_parallel)

_BL = (lg.ACT_BATCH, lg.ACT_LENGTH)


def _head_axis(mesh: Mesh) -> Optional[str]:
  return "tensor" if axis_size(mesh, "tensor") > 1 else None


def mamba2_forward(mixer: Mamba2Mixer, u: jax.Array, mesh: Mesh, *,
                   seq_idx: Optional[jax.Array] = None, ssd_fn: Any = None) -> jax.Array:
  """``Mamba2Mixer.__call__(u, seq_idx=seq_idx)`` over ``mesh``: u (b, l, d) -> (b, l, d).

  Mamba-2 §8. in_proj's columns and the conv's channels are stored group by group
  (``nn.mamba2``'s grouped layout) and sharded over ``tensor`` by the logical table, so
  ``u · in_proj`` on each device gives exactly the z, x, B, C, dt of its own groups' heads
  (a plain local matmul, no weight moves), the conv runs on its own channels, and the only
  collective of the forward is out_proj's all-reduce (row-parallel). Call inside
  ``logical.use_rules(mesh, rules)`` (``ParallelMixer`` does).
  """
  b, l, _ = u.shape
  h, p, g = mixer.nheads, mixer.headdim, mixer.ngroups
  s = mixer.d_ssm
  head_axis = _head_axis(mesh)
  if head_axis is not None and mixer.d_mlp:
    raise ValueError(f"tensor parallelism needs d_ssm == d_inner, got d_ssm = {s}, "
                     f"d_inner = {mixer.d_inner}")
  zxbcdt = mixer.in_proj(u)  # (b, l, 2m + g·k): columns of whole groups on each device
  if not mixer.d_mlp:
    zxbcdt = lg.constrain(zxbcdt.reshape(b, l, g, -1),
                          (*_BL, lg.ACT_GROUPS, None)).reshape(b, l, -1)
  z0, x0, z, xBC, dt = mixer._split(zxbcdt)
  z = lg.constrain(z.reshape(b, l, h, p), (*_BL, lg.ACT_HEADS, None))
  dt = lg.constrain(dt, (*_BL, lg.ACT_HEADS))

  conv_b = None if mixer.conv1d.bias is None else mixer.conv1d.bias[...]
  xBC = causal_conv1d_sequence_parallel(  # channels [x_j | B_j | C_j] of whole groups
      xBC, mixer.conv1d.kernel[...], conv_b, activation="silu", seq_idx=seq_idx, mesh=mesh,
      channel_axis=head_axis)
  x, B, C = mixer._split_conv(xBC)
  x = lg.constrain(x, (*_BL, lg.ACT_HEADS, None))
  B, C = (lg.constrain(v, (*_BL, lg.ACT_GROUPS, None)) for v in (B, C))
  y = ssd_sequence_parallel(
      x, dt, mixer._A(), B, C, chunk_size=mixer.chunk_size, D=mixer._D(),
      z=None if mixer.rmsnorm else z, dt_bias=mixer.dt_bias[...], dt_softplus=True,
      dt_limit=mixer.dt_limit, seq_idx=seq_idx, mesh=mesh, head_axis=head_axis,
      ssd_fn=ssd_fn)
  y = lg.constrain(y.reshape(b, l, s), (*_BL, lg.ACT_INNER))
  # The norm runs under jit's partitioner, which cannot split a Pallas call: over several
  # devices XLA's form, which it shards like the activations.
  out = mixer._output(y, z.reshape(b, l, s), z0, x0,
                      norm_impl="auto" if mesh.devices.size == 1 else "xla")
  return lg.constrain(out, (*_BL, lg.ACT_EMBED))


def mamba1_forward(mixer: Mamba1Mixer, u: jax.Array, mesh: Mesh, *,
                   scan_fn: Any = None) -> jax.Array:
  """``Mamba1Mixer.__call__(u)`` (or SSMNoGate's) over ``mesh``: u (b, l, d) -> (b, l, d).

  in_proj is sharded over ``tensor`` by the logical table: the gated one's columns are
  interleaved per channel (``nn.mamba1``'s layout), so ``u · in_proj`` on each device gives
  exactly the x and z of its own channels (a plain local matmul, no weight moves), split
  by ``mixer._split``. Call inside ``logical.use_rules(mesh, rules)`` (``ParallelMixer``
  does).
  """
  b, l, _ = u.shape
  channel_axis = _head_axis(mesh)
  inner = lambda v: lg.constrain(v, (*_BL, lg.ACT_INNER))
  xz = mixer.in_proj(u)  # (b, l, 2e) [x_c, z_c] pairs, or (b, l, e): own channels per device
  if mixer.GATED:
    xz = lg.constrain(xz.reshape(b, l, mixer.d_inner, 2),
                      (*_BL, lg.ACT_INNER, None)).reshape(b, l, -1)
  x, z = mixer._split(xz)
  x = inner(x)
  z = None if z is None else inner(z)
  conv_b = None if mixer.conv1d.bias is None else mixer.conv1d.bias[...]
  x = causal_conv1d_sequence_parallel(x, mixer.conv1d.kernel[...], conv_b, activation="silu",
                                      mesh=mesh, channel_axis=channel_axis)
  delta, delta_bias, B, C = mixer.ssm_inputs(x)  # x_proj: row-parallel, one all-reduce
  y = selective_scan_sequence_parallel(
      x, inner(delta), mixer.A(x.dtype), B, C, D=mixer.D[...], z=z, delta_bias=delta_bias,
      delta_softplus=True, mesh=mesh, channel_axis=channel_axis, scan_fn=scan_fn)
  out = mixer.out_proj(inner(y))
  return lg.constrain(out, (*_BL, lg.ACT_EMBED))


class ParallelMixer(nnx.Module):
  """Wraps a Mamba2Mixer / Mamba1Mixer / SSMNoGate: its forward runs over ``mesh``.

  Training forward only: ``initial_state`` and ``return_state`` (prefill) raise.
  ``ssd_impl``: the per-device SSD of a Mamba-2 mixer (``mamba_jax.ops.ssd``'s ``impl``).
  "auto", the default, is what the unsharded mixer uses: the fused kernels on Hopper GPUs
  for inputs they take (one H100, mamba2-370m at 8K: 35.7K tokens/s against 24.5K with
  "chunked"), the chunked XLA form elsewhere.
  """

  def __init__(self, mixer: nnx.Module, mesh: Mesh, rules: Rules, ssd_impl: str = "auto"):
    if not isinstance(mixer, (Mamba2Mixer, Mamba1Mixer)):
      raise ValueError(f"ParallelMixer supports Mamba2Mixer and Mamba1Mixer (and SSMNoGate), "
                       f"not {type(mixer).__name__}")
    check_choice("ssd_impl", ssd_impl, ("auto", "chunked", "pallas"))
    self.mixer, self.mesh, self.ssd_impl = mixer, mesh, ssd_impl
    self.rules = tuple(sorted(rules.items()))

  def __call__(self, u: jax.Array, *, initial_state: Any = None,
               seq_idx: Optional[jax.Array] = None, return_state: bool = False) -> jax.Array:
    if initial_state is not None or return_state:
      raise ValueError("ParallelMixer runs the training forward only: initial_state and "
                       "return_state are not supported")
    with lg.use_rules(self.mesh, dict(self.rules)):
      if isinstance(self.mixer, Mamba2Mixer):
        return mamba2_forward(self.mixer, u, self.mesh, seq_idx=seq_idx,
                              ssd_fn=functools.partial(ssd, impl=self.ssd_impl))
      if seq_idx is not None:
        raise ValueError(f"{type(self.mixer).__name__} does not support seq_idx")
      return mamba1_forward(self.mixer, u, self.mesh)


def parallelize(model: nnx.Module, mesh: Mesh, rules: Optional[Rules] = None,
                ssd_impl: str = "auto") -> nnx.Module:
  """Replaces, in place, every SSM mixer of a MambaLM by a :class:`ParallelMixer`.

  Use on a model merged inside the function being traced (the module graph changes).
  Attention layers stay as they are (XLA partitions them over heads from the rules), which
  needs ``sequence`` = 1. ``ssd_impl``: the Mamba-2 mixers' per-device SSD
  (:class:`ParallelMixer`). Returns ``model``.
  """
  rules = rules_for_mesh(mesh) if rules is None else rules
  for layer in model.backbone.layers:
    if isinstance(layer.mixer, Attention):
      if axis_size(mesh, "sequence") > 1:
        raise ValueError("sequence parallelism does not cover attention layers (they need "
                         "the keys and values of the whole sequence)")
      continue
    layer.mixer = ParallelMixer(layer.mixer, mesh, rules, ssd_impl=ssd_impl)
  return model
