"""Sequence parallelism of the SSM ops: SSD, the selective scan and the causal conv, exact.

The length is split over the mesh axis ``axis_name`` (``sequence``): device k holds
positions [k·l_k, (k+1)·l_k). The recurrence h_t = a_t h_{t−1} + (input)_t is linear in
h, so device k's outputs are those computed from a zero state plus the contribution of the
state that enters its shard:

  1. each device runs the per-shard op (``ssd_fn`` / ``scan_fn``: the chunked SSD by
     default, a Pallas kernel later) from a zero state (device 0 from ``initial_states``)
     and gets its final state S_k and the total decay of its shard Λ_k = exp(Σ_t dt_t·A)
     (0 when the shard contains a sequence reset);
  2. an ``all_gather`` over the axis of (S_k, Λ_k) — (b, h, p, n) + (b, h) per device for
     SSD — and an associative scan over devices of (Λ, S) ∘ (Λ', S') = (Λ·Λ', Λ'·S + S')
     give device k its incoming state H_k = Σ_{j<k} (Π_{j<i<k} Λ_i) · S_j and everyone the
     final state;
  3. SSD: y_t += C_t · exp(Σ_{s≤t} dt_s·A) · H_k per head, for the positions before the
     shard's first ``seq_idx`` reset (a reset at position 0 counts when the id differs from
     the left neighbour's last one). Selective scan: the shard is scanned again from H_k
     (the correction would need a (b, l, e, n) tensor; the second pass needs none).

The causal conv needs the d_conv − 1 inputs before the shard: a ``ppermute`` from the left
neighbour (device 0 takes ``initial_states``), masked by ``seq_idx`` as the op does.

Everything is ``jax.shard_map`` with explicit collectives, differentiable (the transposes of
all_gather and ppermute are reduce-scatter and the reverse ppermute). Batch axes and a
head / channel axis (``tensor``) can be split at the same time: SSD heads and their groups,
the scan's and conv's channels, are independent.

Letter legend: b batch, l length, l_k length per device, K devices on the axis, h heads,
p head_dim, n d_state, g groups, e d_inner (channels), w conv width.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from mamba_jax.ops.causal_conv1d import causal_conv1d
from mamba_jax.ops.selective_scan import compute_dtypes, prepare_delta, selective_scan
from mamba_jax.ops.selective_scan import skip_and_gate as scan_skip_and_gate
from mamba_jax.ops.ssd import NO_DT_LIMIT, compute_dtype, preprocess_dt, skip_and_gate, ssd
from mamba_jax.sharding.mesh import BATCH_AXES, axis_size

SsdFn = Callable[..., tuple[jax.Array, jax.Array]]


def _batch_spec(mesh: Mesh, batch_axes: Sequence[str]) -> Any:
  axes = tuple(a for a in batch_axes if a in mesh.shape)
  return axes if axes else None


def _check_split(what: str, size: int, mesh: Mesh, axis: Any) -> None:
  if axis is None:
    return
  ways = 1
  for a in (axis,) if isinstance(axis, str) else axis:
    ways *= axis_size(mesh, a)
  if size % ways:
    raise ValueError(f"{what} = {size} is not divisible by mesh axis {axis!r} of size {ways}, "
                     "over which it is split")


def _shift_right(x: jax.Array, axis_name: str, size: int) -> jax.Array:
  """Device k receives device k−1's x; device 0 receives zeros."""
  return lax.ppermute(x, axis_name, [(i, i + 1) for i in range(size - 1)])


def _incoming_and_final(decay: jax.Array, state: jax.Array, axis_name: str
                        ) -> tuple[jax.Array, jax.Array]:
  """Device k's incoming state Σ_{j<k} (Π_{j<i<k} Λ_i) S_j (zero on device 0) and the final
  state after the last device, from every device's (Λ_k, S_k); Λ broadcasts against S."""
  decays = lax.all_gather(decay, axis_name)  # (K, ...)
  states = lax.all_gather(state, axis_name)  # (K, ...)
  extra = states.ndim - decays.ndim
  # The scan over devices: K steps on (b, h, p, n) states, unrolled (K is small and static;
  # lax.associative_scan would do it in log K steps, but its transpose inside shard_map
  # crashes XLA:CPU in jax 0.11.2).
  carry, inclusive = jnp.zeros_like(states[0]), []
  for j in range(states.shape[0]):
    carry = decays[j].reshape(decays.shape[1:] + (1,) * extra) * carry + states[j]
    inclusive.append(carry)
  inclusive = jnp.stack(inclusive)
  k = lax.axis_index(axis_name)
  before = lax.dynamic_index_in_dim(inclusive, jnp.maximum(k - 1, 0), keepdims=False)
  # inclusive[-1] is the same on every device, but typed as varying over the axis: a sum in
  # which only the last device contributes makes it invariant (exact: the others add 0).
  last = inclusive[-1]
  final = lax.psum(jnp.where(k == decays.shape[0] - 1, last, jnp.zeros_like(last)), axis_name)
  return jnp.where(k > 0, before, jnp.zeros_like(before)), final


def _live(seq_idx: jax.Array, axis_name: str, size: int) -> jax.Array:
  """(b, l_k) bool: no reset of seq_idx at or before t in this shard (position 0 compared
  with the left neighbour's last id; device 0 with the virtual id 0 of the ops)."""
  prev_last = _shift_right(seq_idx[:, -1], axis_name, size)
  prev = jnp.concatenate([prev_last[:, None], seq_idx[:, :-1]], axis=1)
  return jnp.cumsum((seq_idx != prev).astype(jnp.int32), axis=1) == 0


def ssd_sequence_parallel(
    x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
    chunk_size: int = 256, D: Optional[jax.Array] = None, z: Optional[jax.Array] = None,
    dt_bias: Optional[jax.Array] = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT, initial_states: Optional[jax.Array] = None,
    seq_idx: Optional[jax.Array] = None, return_final_states: bool = False, *, mesh: Mesh,
    axis_name: str = "sequence", batch_axes: Sequence[str] = BATCH_AXES,
    head_axis: Optional[str] = None, ssd_fn: Optional[SsdFn] = None):
  """``mamba_jax.ops.ssd.ssd`` with the length split over ``axis_name`` (module docstring).

  Same arguments and result as ``ssd`` (x (b, l, h, p), dt (b, l, h), A (h,), B, C
  (b, l, g, n), D (h,) or (h, p), z like x, dt_bias (h,), initial_states (b, h, p, n),
  seq_idx (b, l)), plus:

  Args:
    mesh: the device mesh.
    axis_name: the mesh axis the length is split over.
    batch_axes: mesh axes the batch is split over (those absent from the mesh are ignored).
    head_axis: optional mesh axis the heads and groups are split over (tensor parallelism);
      needs g divisible by its size.
    ssd_fn: the per-shard op, called as ``ssd_fn(x, dt, A, B, C, chunk_size=...,
      initial_states=..., seq_idx=..., return_final_states=True)`` with dt already
      preprocessed (compute dtype) and x in its own dtype; ``ssd(impl="chunked")`` by
      default.

  Returns:
    y (b, l, h, p) in x's dtype [, final_states (b, h, p, n) in the compute dtype].
  """
  ssd_fn = ssd_fn or functools.partial(ssd, impl="chunked")
  b, l, h, p = x.shape
  g = B.shape[2]
  size = axis_size(mesh, axis_name)
  batch = _batch_spec(mesh, batch_axes)
  _check_split("length", l, mesh, axis_name)
  _check_split("batch", b, mesh, batch)
  _check_split("heads", h, mesh, head_axis)
  _check_split("groups (B.shape[2])", g, mesh, head_axis)

  args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, init=initial_states,
              seq=seq_idx)
  args = {k: v for k, v in args.items() if v is not None}
  act = P(batch, axis_name, head_axis, None)
  specs = dict(x=act, dt=P(batch, axis_name, head_axis), A=P(head_axis), B=act, C=act,
               D=P(head_axis) if D is None or D.ndim == 1 else P(head_axis, None), z=act,
               dt_bias=P(head_axis), init=P(batch, head_axis, None, None),
               seq=P(batch, axis_name))
  specs = {k: specs[k] for k in args}

  def local(a: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    dtype = compute_dtype(a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("D"), a.get("z"),
                          a.get("dt_bias"), a.get("init"))
    k = lax.axis_index(axis_name)
    dtp = preprocess_dt(a["dt"], a.get("dt_bias"), dt_softplus, dt_limit, dtype)
    A_ = a["A"].astype(dtype)
    init = a.get("init")
    if init is not None:
      init = jnp.where(k == 0, init.astype(dtype), jnp.zeros_like(init, dtype))
    # x in its own dtype, as ``ssd`` passes it to its forms (bf16 tensor-core matmuls for a
    # bf16 model); dt, A and the state corrections below in the compute dtype. ``ssd`` returns
    # y in x's dtype, so for a bf16 model y is rounded to bf16 once more than unsharded (before
    # the correction, D and z): bf16-level, and nothing changes for float32 / float64 inputs.
    y, state = ssd_fn(a["x"], dtp, A_, a["B"], a["C"], chunk_size=chunk_size,
                      initial_states=init, seq_idx=a.get("seq"), return_final_states=True)
    y, state = y.astype(dtype), state.astype(dtype)
    if size > 1:
      cum = jnp.cumsum(dtp * A_, axis=1)  # (b, l_k, h)
      live = (jnp.ones(cum.shape[:2], bool) if "seq" not in a
              else _live(a["seq"], axis_name, size))
      decay = jnp.where(live[:, -1:], jnp.exp(cum[:, -1]), 0)  # (b, h)
      incoming, state = _incoming_and_final(decay, state, axis_name)
      bl, lk, hl = cum.shape
      gl = a["B"].shape[2]
      incoming = incoming.reshape(bl, gl, hl // gl, p, -1)
      corr = jnp.einsum("blgn,bgjpn->blgjp", a["C"].astype(dtype), incoming)
      weight = jnp.where(live[..., None], jnp.exp(cum), 0)  # (b, l_k, h)
      y = y + corr.reshape(bl, lk, hl, p) * weight[..., None]
    y = skip_and_gate(y, a["x"], a.get("D"), a.get("z"))
    return y.astype(a["x"].dtype), state

  out = jax.shard_map(local, mesh=mesh, in_specs=(specs,), check_vma=False,
                      out_specs=(act, P(batch, head_axis, None, None)))(args)
  return out if return_final_states else out[0]


def selective_scan_sequence_parallel(
    u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
    D: Optional[jax.Array] = None, z: Optional[jax.Array] = None,
    delta_bias: Optional[jax.Array] = None, delta_softplus: bool = False,
    initial_state: Optional[jax.Array] = None, return_final_state: bool = False, *,
    mesh: Mesh, axis_name: str = "sequence", batch_axes: Sequence[str] = BATCH_AXES,
    channel_axis: Optional[str] = None, scan_fn: Optional[SsdFn] = None):
  """``mamba_jax.ops.selective_scan.selective_scan`` with the length split over
  ``axis_name``: two passes per shard (module docstring), states exchanged in between.

  Same arguments and result as ``selective_scan`` (u, delta, z (b, l, e), A (e, n), B, C
  (b, l, n) or (b, l, g, n), D, delta_bias (e,), initial_state (b, e, n)), plus ``mesh``,
  ``axis_name``, ``batch_axes``, ``channel_axis`` (optional mesh axis splitting e and the
  groups of B, C) and ``scan_fn`` (the per-shard op with ``selective_scan``'s signature;
  ``selective_scan`` by default). The exchange is an all_gather of (b, e, n) states and
  decays per device.
  """
  scan_fn = scan_fn or selective_scan
  b, l, e = u.shape
  size = axis_size(mesh, axis_name)
  batch = _batch_spec(mesh, batch_axes)
  _check_split("length", l, mesh, axis_name)
  _check_split("batch", b, mesh, batch)
  _check_split("d_inner", e, mesh, channel_axis)
  grouped = B.ndim == 4
  if grouped:
    _check_split("groups (B.shape[2])", B.shape[2], mesh, channel_axis)
  args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
              init=initial_state)
  args = {k: v for k, v in args.items() if v is not None}
  seq3 = P(batch, axis_name, channel_axis)
  bc = P(batch, axis_name, channel_axis, None) if grouped else P(batch, axis_name, None)
  specs = dict(u=seq3, delta=seq3, A=P(channel_axis, None), B=bc, C=bc, D=P(channel_axis),
               z=seq3, delta_bias=P(channel_axis), init=P(batch, channel_axis, None))
  specs = {k: specs[k] for k in args}

  def local(a: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    real, state_dtype = compute_dtypes(a["A"], a["u"], a["delta"], a["B"], a["C"], a.get("D"),
                                       a.get("z"), a.get("delta_bias"), a.get("init"))
    k = lax.axis_index(axis_name)
    delta_ = prepare_delta(a["delta"], a.get("delta_bias"), delta_softplus, real)
    A_ = a["A"].astype(state_dtype)
    init = a.get("init")
    if init is not None:
      init = jnp.where(k == 0, init.astype(state_dtype), jnp.zeros_like(init, state_dtype))
    if size > 1:
      _, state = scan_fn(a["u"], delta_, A_, a["B"], a["C"], initial_state=init,
                         return_final_state=True)
      decay = jnp.exp(jnp.sum(delta_, axis=1)[..., None] * A_)  # (b, e, n)
      incoming, _ = _incoming_and_final(decay, state.astype(state_dtype), axis_name)
      init = incoming if init is None else jnp.where(k == 0, init, incoming)
    y, state = scan_fn(a["u"], delta_, A_, a["B"], a["C"], initial_state=init,
                       return_final_state=True)
    if size > 1:
      # The final state: device K-1's, broadcast by a sum where only it contributes.
      last = k == size - 1
      state = lax.psum(jnp.where(last, state, jnp.zeros_like(state)), axis_name)
    y = scan_skip_and_gate(y.astype(real), a["u"], a.get("D"), a.get("z"), real)
    return y.astype(a["u"].dtype), state.astype(state_dtype)

  out = jax.shard_map(local, mesh=mesh, in_specs=(specs,), check_vma=False,
                      out_specs=(seq3, P(batch, channel_axis, None)))(args)
  return out if return_final_state else out[0]


def causal_conv1d_sequence_parallel(
    x: jax.Array, weight: jax.Array, bias: Optional[jax.Array] = None,
    activation: Optional[str] = None, initial_states: Optional[jax.Array] = None,
    seq_idx: Optional[jax.Array] = None, return_final_states: bool = False, *, mesh: Mesh,
    axis_name: str = "sequence", batch_axes: Sequence[str] = BATCH_AXES,
    channel_axis: Optional[str] = None, conv_fn: Callable[..., Any] = causal_conv1d):
  """``mamba_jax.ops.causal_conv1d.causal_conv1d`` with the length split over ``axis_name``.

  Same arguments and result (x (b, l, c), weight (c, w), bias (c,), initial_states
  (b, c, w − 1), seq_idx (b, l)), plus ``mesh``, ``axis_name``, ``batch_axes``,
  ``channel_axis``. Each device receives the last w − 1 inputs of its left neighbour by a
  ``ppermute`` (device 0 takes ``initial_states``), keeps those of its first position's
  sequence, and convolves with ids relative to its first position (so the history's virtual
  id 0 is that sequence). Needs l / K >= w − 1.
  """
  b, l, c = x.shape
  width = weight.shape[1]
  size = axis_size(mesh, axis_name)
  batch = _batch_spec(mesh, batch_axes)
  _check_split("length", l, mesh, axis_name)
  _check_split("batch", b, mesh, batch)
  _check_split("channels", c, mesh, channel_axis)
  if size > 1 and l // size < width - 1:
    raise ValueError(f"length / {axis_name} = {l} / {size} = {l // size} tokens per device is "
                     f"fewer than the conv history w - 1 = {width - 1}, which must come from "
                     "the left neighbour alone")
  args = dict(x=x, weight=weight, bias=bias, init=initial_states, seq=seq_idx)
  args = {k: v for k, v in args.items() if v is not None}
  act = P(batch, axis_name, channel_axis)
  specs = dict(x=act, weight=P(channel_axis, None), bias=P(channel_axis),
               init=P(batch, channel_axis, None), seq=P(batch, axis_name))
  specs = {k: specs[k] for k in args}
  state_spec = P(batch, channel_axis, None)

  def local(a: dict[str, jax.Array]):
    xl, seq = a["x"], a.get("seq")
    hist = a.get("init")
    if size > 1 and width > 1:
      k = lax.axis_index(axis_name)
      halo = jnp.swapaxes(_shift_right(xl[:, l // size - (width - 1):], axis_name, size),
                          1, 2)  # (b, c, w - 1)
      hist = halo if hist is None else jnp.where(k == 0, hist.astype(halo.dtype), halo)
      if seq is not None:
        ids = _shift_right(seq[:, l // size - (width - 1):], axis_name, size)  # (b, w - 1)
        hist = jnp.where((ids == seq[:, :1])[:, None, :], hist, jnp.zeros_like(hist))
        seq = seq - seq[:, :1]
    out = conv_fn(xl, a["weight"], a.get("bias"), activation=activation, initial_states=hist,
                  seq_idx=seq, return_final_states=True)
    y, state = out
    if size > 1:
      last = lax.axis_index(axis_name) == size - 1
      state = lax.psum(jnp.where(last, state, jnp.zeros_like(state)), axis_name)
    return y, state

  out = jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=(act, state_spec),
                      check_vma=False)(args)
  return out if return_final_states else out[0]
